"""Data of the embedded default reward model: ``head.safetensors`` (the trained scalar head,
``score.weight`` float32 [1, 576]) and ``MODEL_CARD.md``. A package so the files ship in the wheel."""
