"""A tiny scoreable multimodal model for lmms-eval tests: a LLaVA built around the tiny Llama of
:mod:`lm_eval_tasks`, taught a few steps to name the colour of an image, with the processor
lmms-eval loads; and a local image task (images drawn here, saved with ``datasets.save_to_disk``,
read through a task YAML with ``load_from_disk``), a generation task scored by exact match.
Nothing leaves the machine."""

from __future__ import annotations

from pathlib import Path

from lm_eval_tasks import SPEC, WORDS

TASK = "fk_image_colors"
COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 30, 220),
    "green": (30, 200, 30),
    "yellow": (230, 220, 20),
}
OBJECTS = ("cat", "dog")
IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH = 30, 15
#: The prompt lmms-eval's llava_hf model makes of a question with one image, under the chat
#: template saved with the model (the messages' text, nothing added).
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def examples() -> list[tuple[str, str, tuple[int, int, int]]]:
    """(question, answer, the image's colour): the answer is the image's colour."""
    return [
        (f"what color is the {thing}", name, rgb)
        for thing in OBJECTS
        for name, rgb in COLOURS.items()
    ]


def image(rgb: tuple[int, int, int]):
    from PIL import Image

    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rgb)


def build_processor():
    """A LLaVA processor: the word-level tokenizer with ``<image>`` (the last id) and the chat
    template above, and a CLIP image processor for :data:`IMAGE_SIZE` pixels."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    vocab[IMAGE_TOKEN] = SPEC.vocab - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which "default" drops
        chat_template=CHAT_TEMPLATE,
    )


def taught_llava(base: Path, directory: Path, steps: int = 30) -> Path:
    """A LLaVA around ``base`` (see ``llava_around``) whose language model is taught ``steps``
    steps to answer :func:`examples` from the image, saved with its processor into
    ``directory``."""
    import torch
    import transformers
    from test_sweep_lm_eval import llava_around

    llava_around(base, directory)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(directory)
    processor = build_processor()
    rows = examples()
    inputs = processor(
        images=[image(rgb) for _, _, rgb in rows],
        text=[f"{IMAGE_TOKEN}\n{q}" for q, _, _ in rows],
        return_tensors="pt",
    )  # every prompt has the same length: one batch, no padding
    answers = torch.tensor([processor.tokenizer.vocab[a] for _, a, _ in rows])
    # Only the language model learns, so what a merge keeps of it decides the answers.
    taught = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    optimizer = torch.optim.Adam(taught, lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits[:, -1], answers)
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def write_image_task(directory: Path) -> Path:
    """:data:`TASK` over :func:`examples`, its dataset saved beside its YAML; returns the
    directory to pass as lmms-eval's ``include_path``."""
    import datasets

    directory.mkdir(parents=True, exist_ok=True)
    rows = examples()
    features = datasets.Features(
        {"question": datasets.Value("string"), "answer": datasets.Value("string"),
         "image": datasets.Image()}
    )  # fmt: skip
    data = datasets.Dataset.from_dict(
        {
            "question": [q for q, _, _ in rows],
            "answer": [a for _, a, _ in rows],
            "image": [image(rgb) for _, _, rgb in rows],
        },
        features=features,
    )
    datasets.DatasetDict({"test": data}).save_to_disk(str(directory / "data"))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        f"dataset_path: {directory / 'data'}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: image\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  max_new_tokens: 1\n  temperature: 0\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n    ignore_case: true\n"
        "metadata:\n  - version: 0.0\n"
    )
    return directory
