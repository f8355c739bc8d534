"""minisdpo: Softmax-DPO (S-DPO) for LLM recommenders, with a fused C++/CUDA loss kernel.

Modules (arrows point one way; docs/design.md section 2): ``loss`` is the plain PyTorch reference,
``ops`` the fused kernels, ``model``/``checkpoint``/``lora``/``tokenizer`` the Llama side,
``data`` and ``evaluate`` the recommendation task, ``train`` the command line.
"""
__version__ = "0.1.0"
