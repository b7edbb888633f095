"""Endpoint groups, one module per area of the client-server spec.

Each group is a mixin over `matrix_api.http.HTTPCore`: a method builds a `Request`
and names the decoder of its answer; sending, auth and errors are the core's.
"""
