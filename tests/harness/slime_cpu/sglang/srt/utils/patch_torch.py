def monkey_patch_torch_reductions():
    """Stub: patches CUDA tensor IPC for SGLang weight updates; nothing to do on CPU."""
