"""Small bridges to transformers' own Qwen3-VL classes, used by the eager reference and parity tests.

transformers' `Qwen3VLProcessor` insists on a video processor, and the Qwen3-VL video processor needs
torchvision (PyPI's torchvision wheel is a CUDA build whose C++ ops cannot load beside the CPU torch wheel, so
`import torchvision` fails; the CPU build is only on PyTorch's own index). Images are all we use, so this builds
the same processor class with image processor + tokenizer only; everything it computes (template
rendering, `<|image_pad|>` expansion, `mm_token_type_ids`) is transformers' own code.

The chat template is the one `Qwen3VLProcessor.from_pretrained` would hold, found by transformers' own
`ProcessorMixin.get_processor_dict` (processor_config.json's entry, else chat_template.json, else
chat_template.jinja); only when that finds none, the tokenizer's (`chat_template.jinja`, else
tokenizer_config.json's entry), as the runtime does (`qvl.runtime.chat_template_source`), where transformers'
processor would refuse. The image processor is `Qwen2VLImageProcessorPil`, chosen explicitly: checkpoints name
`Qwen2VLImageProcessorFast` (the torchvision backend, which transformers picks whenever torchvision imports);
the runtime is bit-exact with the PIL one, and tests/test_fast_processor.py measures it against the
torchvision one.
"""

from __future__ import annotations

from pathlib import Path


def image_only_processor(checkpoint: Path):
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # Mirrors Qwen3VLProcessor.__init__ minus the video processor.
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
            self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint))
    processor_dict, _ = Qwen3VLProcessor.get_processor_dict(str(checkpoint))
    chat_template = processor_dict.get("chat_template")
    if chat_template is None:  # transformers' processor has none: the tokenizer's (see the module docstring)
        chat_template = tokenizer.chat_template
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


ORACLE_IMAGE_PROCESSOR = "Qwen2VLImageProcessorPil"  # what `image_only_processor` preprocesses with
