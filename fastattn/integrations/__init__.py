"""fastattn under other libraries' models.

- :mod:`fastattn.integrations.transformers` -- a Hugging Face ``transformers`` attention
  backend (``attn_implementation="fastattn"``), for CPU torch tensors.

Each integration imports its library only when used: importing this package needs
neither torch nor transformers. Install them with the extra:
``pip install "fastattn[transformers]"``.
"""
