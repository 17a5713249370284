"""Test-only stub of httpx: slime.utils.http_utils imports it at module load to talk to SGLang
servers; the CPU test trains from saved rollout data (--debug-train-only), with no server."""


class HTTPStatusError(Exception):
    pass


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("httpx stub: no HTTP client in the CPU test (no inference engine)")


AsyncClient = Client = _Unavailable


class Limits:
    def __init__(self, *args, **kwargs):
        pass


Timeout = Limits
