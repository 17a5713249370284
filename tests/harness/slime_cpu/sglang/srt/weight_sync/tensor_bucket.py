class FlattenedTensorBucket:
    """Stub: buckets weights for SGLang weight updates, which the CPU test does not run."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("sglang stub: no inference engine in the CPU test")
