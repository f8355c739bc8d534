"""minisdpo: Softmax-DPO (S-DPO) for LLM recommenders, with a fused C++/CUDA loss kernel.

Modules (arrows point one way; docs/design.md section 2): ``loss`` is the loss in plain PyTorch,
``ops`` its fused kernels, ``model``/``checkpoint``/``lora``/``tokenizer`` the Llama side,
``data``/``batches``/``step``/``evaluate`` the recommendation task, ``trainer`` the training loop,
``train``, ``recommend``, ``convert`` and ``bench`` the commands.
"""
__version__ = "0.1.0"
