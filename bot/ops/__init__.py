"""What an operator reads: readiness, health and metrics, over one small HTTP listener.

    health.py   the facts the runtime records (sync loop, store writes, the start-up
                gate) and the two judgements made from them: ready? healthy?
    metrics.py  the Prometheus metric objects, in one registry per runtime
    http.py     the ASGI app (/readyz, /healthz, /metrics) and its serving by
                hypercorn's trio worker inside the runtime's nursery
    status.py   ``python -m bot status``: the same facts, read from the listener

Nothing here sits on the message path but counters: recording a fact is an attribute
write or a counter increment, and every label value comes from a small fixed set.
"""
