def register_vllm():
    pass
