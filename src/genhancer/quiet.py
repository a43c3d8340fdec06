"""Known third-party noise, silenced once by the CLI; and how to recognise running out of memory.

Each filter names one message that says nothing a genhancer user can act on:

* transformers' "bos_token_id / eos_token_id must be within the vocabulary" on configs built from the shipped
  presets (``genhancer info``), whose text towers keep the hub configs' token ids;
* transformers' ``is_gradient_checkpointing`` FutureWarning, raised inside peft when LoRA wraps the encoder;
* the image-processor backend fallback lines (torchvision is not a dependency: the PIL backend is the one used);
* DeepSpeed's "Setting accelerator to CPU" when it is imported on a machine without a GPU;
* torch's CPU ``rms_norm`` note that bf16 inputs with fp32 weights take the unfused kernel.
"""

from __future__ import annotations

import logging
import warnings

_LOG_FILTERS = {
    "transformers.configuration_utils": "must be `None` or an integer within the vocabulary",
    "transformers.models.auto.image_processing_auto": "backend is not available. Falling back to",
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    "DeepSpeed": "Setting accelerator to CPU",
}


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_third_party() -> None:
    """Install the filters above (idempotent), and turn off transformers' per-tensor loading bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # they drown the run's own progress
    for name, text in _LOG_FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.text == text for f in logger.filters):
            logger.addFilter(_Drop(text))
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)


def out_of_memory(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from or while handling, is the device or the host running out of
    memory."""
    import torch

    while error is not None:
        if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
            return True
        text = str(error)
        if isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()):
            return True
        error = error.__cause__ or error.__context__
    return False
