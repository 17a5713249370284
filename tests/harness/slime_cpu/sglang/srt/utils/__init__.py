class MultiprocessingSerializer:
    """Stub: serialises weights for SGLang engines, which the CPU test does not run."""

    @staticmethod
    def serialize(*args, **kwargs):
        raise RuntimeError("sglang stub: no inference engine in the CPU test")

    deserialize = serialize


def kill_process_tree(*args, **kwargs):
    raise RuntimeError("sglang stub: no inference engine in the CPU test")
