"""HTTP plumbing below both sides: the HTTP/1.1 client pool, the server thread, ASGI helpers.

Imports nothing from the rest of stillhouse: the teacher, the guard and ``serve`` stand on it.
"""
