"""One module per kind of fault; each ``run_*`` is one scenario and returns its `Figures`."""
