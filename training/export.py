"""Export: the pipeline folder users download (EMA weights, raw weights as a variant, model card,
sample grid, training configuration), and its upload to the Hub."""

import json
import os
from typing import List, Optional, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData, create_repo, upload_folder

# what belongs on the Hub; checkpoints/ and logs/ stay local
EXPORTED_PATTERNS = ["model_index.json", "*.py", "unet/*", "scheduler/*", "README.md", "samples.png", "denoising.gif",
                     "training_config.json", "metrics.json"]

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A DDPM (Ho et al., 2020) trained with [pipeline-ddpm-custom](https://pypi.org/project/pipeline-ddpm-custom/)'s
`accelerate` script{{ dataset_sentence }}. The weights are the EMA weights{{ variant_sentence }}.

![samples](samples.png){{ gif_line }}

## Use

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{{ repo_id }}", trust_remote_code=True)
images = pipe(batch_size=16, num_inference_steps={{ steps }}, eta={{ eta }},{{ labels_argument }}{{ guidance_argument }} generator=torch.Generator().manual_seed(0)).images
```

`eta=1` is DDPM ancestral sampling, `eta=0` deterministic DDIM.{{ labels_sentence }}{{ guidance_sentence }}

With `pip install pipeline-ddpm-custom`, `pipeline_ddpm_custom.DDPMCustomPipeline.from_pretrained("{{ repo_id }}")`
loads it without remote code.

## Training configuration

```json
{{ config_json }}
```
{{ metrics_section }}{{ notes_section }}
"""


def guidance_argument(guidance_scale: float, guidance_interval: Optional[Sequence[int]]) -> str:
    """The usage example's guidance keywords (none without guidance)."""
    if guidance_scale == 1.0:
        return ""
    interval = f" guidance_interval=({guidance_interval[0]}, {guidance_interval[1]})," if guidance_interval else ""
    return f" guidance_scale={guidance_scale:g},{interval}"


def guidance_description(guidance_scale: float, guidance_interval: Optional[Sequence[int]]) -> str:
    """Guidance in words, for the card's prose and its metrics rows."""
    where = f"only at t = {guidance_interval[0]}-{guidance_interval[1]}" if guidance_interval else "at every step"
    return f"classifier-free guidance {guidance_scale:g} {where}"


def guidance_sentence(guidance_scale: float, guidance_interval: Optional[Sequence[int]]) -> str:
    """The sentence under the usage example that says what its guidance keywords do (none without guidance)."""
    if guidance_scale == 1.0:
        return ""
    why = (": `guidance_interval` keeps it to the steps whose timestep lies in it, the class's own prediction alone "
           "elsewhere (Kynkäänniemi et al. 2024)") if guidance_interval else ""
    return f" The example adds {guidance_description(guidance_scale, guidance_interval)}{why}."


def class_names_sentence(folder: str) -> str:
    """The card's list of the classes where the saved pipeline names them (id2label in model_index.json)."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.exists(index):
        return ""
    with open(index) as f:
        id2label = json.load(f).get("id2label") or {}
    if not id2label:
        return ""
    classes = sorted(id2label.items(), key=lambda item: int(item[0]))  # JSON keeps the ids as text
    listed = ", ".join(f"{i} {name}" for i, name in classes)
    return (f" The classes: {listed}; `class_labels` also takes their names (e.g. `class_labels=\"{classes[-1][1]}\"`), "
            "and `pipe.get_label_ids(names)` gives their ids.")


def write_model_card(folder: str, repo_id: str, config: dict, dataset: Optional[str], metrics: Optional[dict] = None,
                     eval_results: Optional[List[EvalResult]] = None,
                     license: str = "apache-2.0", tags: Optional[List[str]] = None, eta: float = 0.0,
                     notes: Optional[str] = None, steps: int = 50, guidance_scale: float = 1.0,
                     guidance_interval: Optional[Sequence[int]] = None) -> str:
    """README.md with the Hub metadata (library, pipeline tag, license, dataset, tags), the training
    configuration, the sample grid (and denoising GIF when the folder has one) and any metrics.

    ``dataset``: a Hub dataset id goes into the metadata; a local path is only named in the text.
    ``eta``, ``steps``, ``guidance_scale``, ``guidance_interval``: the sampling the usage example recommends
    (guidance only for a class-conditional model: it needs the class labels the example passes).
    ``eval_results``: the metrics again as model-index entries in the metadata, which the Hub shows on the model's page.
    ``notes``: Markdown appended after the metrics (measurements the evaluation files do not carry, history)."""
    hub_dataset = dataset if dataset and not os.path.exists(dataset) else None
    num_classes = config.get("num_classes")
    if guidance_scale != 1.0 and not num_classes:
        raise ValueError(f"guidance_scale={guidance_scale:g} needs a class-conditional model; this one has no classes.")
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=license,
        datasets=[hub_dataset] if hub_dataset else None,
        tags=["diffusers", "ddpm", "pipeline-ddpm-custom", "unconditional-image-generation"]
        + (["class-conditional"] if num_classes else []) + list(tags or []),
        model_name=repo_id.split("/")[-1] if eval_results else None,  # model-index needs a name
        eval_results=eval_results,
    )
    metrics_section = ""
    if metrics:
        rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
        metrics_section = f"\n## Metrics\n\n| metric | value |\n|---|---|\n{rows}\n"
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        dataset_sentence=f" on `{hub_dataset or os.path.basename(os.path.normpath(dataset))}`" if dataset else "",
        variant_sentence="; the raw weights are the `non_ema` variant"
        if os.path.exists(os.path.join(folder, "unet", "diffusion_pytorch_model.non_ema.safetensors")) else "",
        gif_line="\n\n![denoising](denoising.gif)" if os.path.exists(os.path.join(folder, "denoising.gif")) else "",
        eta=f"{eta:g}",
        steps=steps,
        guidance_argument=guidance_argument(guidance_scale, guidance_interval),
        guidance_sentence=guidance_sentence(guidance_scale, guidance_interval),
        labels_argument=f" class_labels=[i % {num_classes} for i in range(16)]," if num_classes else "",
        labels_sentence=(f" Class-conditional: `class_labels` takes one label in 0..{num_classes - 1} or one per image; "
                         "without labels it samples the null class, the unconditional model classifier-free guidance "
                         "starts from, which was trained only on the training images whose labels were dropped and is "
                         "usually far weaker: pass labels, as above, for the model's best samples; `guidance_scale` > 1 "
                         "adds classifier-free guidance." + class_names_sentence(folder)) if num_classes else "",
        config_json=json.dumps(config, indent=2, sort_keys=True, default=str),
        metrics_section=metrics_section,
        notes_section=f"\n{notes.strip()}\n" if notes and notes.strip() else "",
    )
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path


def push_folder(folder: str, repo_id: str, private: bool = False, token: Optional[str] = None, commit_message: str = "Upload DDPM pipeline"):
    """Create the repo if needed and upload the exported pipeline files (never checkpoints or logs)."""
    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return upload_folder(repo_id=repo_id, folder_path=folder, token=token, commit_message=commit_message,
                         allow_patterns=EXPORTED_PATTERNS)
