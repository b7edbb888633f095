"""What every fault scenario is built from; see the package's docstring for the map."""
