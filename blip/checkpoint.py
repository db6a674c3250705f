"""Load any BLIP checkpoint into our model, in a fixed order (as open_clip's factory):

resolve (path or hub id) -> read safely -> detect the format by sentinel keys / files -> rename -> read the tokenizer
and take the special ids from it -> resize position embeddings -> strict load -> eval().to(device, dtype).

The public surface (also exported as `blip.<name>`): `resolve`, `read_config`, `load`, `save_pretrained`,
`convert_checkpoint`, `CheckpointError`. Everything that loads a checkpoint (inference, training, evaluation) goes
through `load`; `read_config` is the cheap check before any work (the config and the tokenizer, no weights where the
format allows); `transfer_weights` starts a model of one family from another's weights (training).

Formats: an original Salesforce `.pth` (`{"model": sd}` or a bare state dict), a transformers folder
(BlipForConditionalGeneration / BlipForImageTextRetrieval / BlipForQuestionAnswering; safetensors or .bin, sharded
or not), our folder (`config.json` + `model.safetensors` + tokenizer files), or a Hugging Face hub id.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blip.config import BlipConfig
from blip.convert import TRAINING_STATE, config_from_hf, config_from_original, hf_to_original, interpolate_pos_embed
from blip.hub import looks_like_hub_id
from blip.tokenizer import build_tokenizer

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
FORMAT_TAG = "capfilt-blip"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: one clear message naming the file."""


# -- read safely ----------------------------------------------------------------------------------------------------


def _read_file(path: Path) -> dict[str, Tensor]:
    """A weights file -> flat state dict. Never unpickles arbitrary objects (`weights_only=True`)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip / safetensors header errors all mean "not a readable checkpoint"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {msg}") from None
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict", "module"):  # original BLIP saves {"model": sd, "optimizer": ...}
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} is not a state dict: expected a dict of tensors (or {{'model': state_dict}}), got {type(obj).__name__}"
        )
    # DistributedDataParallel wraps every key in "module."
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _read_folder_weights(folder: Path) -> dict[str, Tensor]:
    for name in WEIGHT_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):  # sharded: {"weight_map": {key: shard file}}
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            sd: dict[str, Tensor] = {}
            for shard in shards:
                sd.update(_read_file(folder / shard))
            return sd
        return _read_file(f)
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def resolve(path_or_id: str | os.PathLike[str]) -> Path:
    """A local path, or a hub id resolved through huggingface_hub (HF_HUB_OFFLINE honoured) -> a local path.

    Raises FileNotFoundError for a path-like string that does not exist, CheckpointError for an unreachable hub id.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    s = str(path_or_id)
    if not looks_like_hub_id(s):
        raise FileNotFoundError(f"checkpoint {s} does not exist (expected a .pth file, a model folder or a hub id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{s!r} is no local file or folder, and could not get it from the Hugging Face hub ({reason}); "
            f"download it where there is network "
            f"(`hf download {s} --local-dir DIR`) and pass the local folder or .pth path instead"
        ) from None


# -- detect + rename --------------------------------------------------------------------------------------------------


def read_checkpoint(path: Path, family: str | None = None) -> tuple[BlipConfig, dict[str, Tensor], str]:
    """Path -> (config, state dict with original key names, format name: "capfilt" | "transformers" | "original")."""
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            pths = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt"))
            if len(pths) == 1:  # a folder holding one original checkpoint (+ maybe a tokenizer)
                return read_checkpoint(pths[0], family)
            raise CheckpointError(f"{path} has no config.json: expected our folder, a transformers folder or one .pth")
        cfg, fmt = _folder_config(cfg_file, family)
        sd = _read_folder_weights(path)
        return cfg, (_hf_to_original(sd, path) if fmt == "transformers" else sd), fmt
    sd = _read_file(path)
    if any(k.startswith("vision_model.") for k in sd):  # a bare transformers weights file: sizes from shapes
        sd = _hf_to_original(sd, path)
    elif not any(k.startswith("visual_encoder.") for k in sd):
        raise CheckpointError(
            f"{path}: unknown checkpoint layout; expected original BLIP keys (visual_encoder.*, text_encoder.*, "
            f"text_decoder.*) or transformers keys (vision_model.*); found e.g. {', '.join(list(sd)[:3])}"
        )
    try:
        return config_from_original(sd, family), sd, "original"
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _hf_to_original(sd: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    try:
        return hf_to_original(sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _with_family(cfg: BlipConfig, family: str) -> BlipConfig:
    return replace(cfg, family=family, vision=replace(cfg.vision), text=replace(cfg.text))


# -- strict load ------------------------------------------------------------------------------------------------------


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys sharing one storage (tied LM head, encoder/decoder sharing in pretraining), first name first."""
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        groups.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def load_state_dict_checked(
    model: nn.Module, sd: dict[str, Tensor], source: str, family_overridden: bool, from_transformers: bool = False
) -> None:
    """Strict load with the known differences handled explicitly:
    - `position_ids` buffers (arange; transformers does not save them) and `temp` (transformers retrieval has none)
      may be missing, and keys that alias another parameter (tied LM head, shared layers) may be either;
    - training state (momentum copies `*_m`, queues) is dropped when the model has no place for it;
    - towers the requested family lacks are dropped only when the family was asked for (a pretrained checkpoint
      loaded as a captioner, as the original fine-tuning does). Everything else must match exactly.
    """
    own = model.state_dict()
    present_alias = {k for g in _alias_groups(model) if any(n in sd for n in g) for k in g}
    own_tops = {k.split(".")[0] for k in own}
    unexpected = [k for k in sd if k not in own]
    bad = [
        k
        for k in unexpected
        if not (
            TRAINING_STATE.match(k)
            or k.endswith("position_ids")
            or (family_overridden and k.split(".")[0] not in own_tops)
        )
    ]
    missing = [
        k
        for k in own
        if k not in sd and not (k.endswith("position_ids") or (from_transformers and k == "temp") or k in present_alias)
    ]
    if bad or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if bad:
            parts.append(f"unexpected {len(bad)} keys (e.g. {', '.join(bad[:3])})")
        raise CheckpointError(f"{source} does not fit a BLIP {model.config.family} model: {'; '.join(parts)}")
    shape_errors = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape
    ]
    if shape_errors:
        raise CheckpointError(
            f"{source}: shape mismatch for {len(shape_errors)} keys, e.g. {'; '.join(shape_errors[:3])}"
        )
    # an aliased storage is written through whichever of its names the checkpoint has
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


# role -> (what it is called, the families that can serve it): a pretrain checkpoint has the captioner's and filter's heads
ROLES = {
    "captioner": ("a captioner", ("caption", "pretrain")),
    "filter": ("a filter", ("retrieval", "pretrain")),
    "vqa": ("question answering", ("vqa",)),
}


def check_family(family: str, role: str, source: str, task: str | None = None) -> None:
    """The one rule for which checkpoint can serve a role (`capfilt run`'s models and CapFiltStage, eval,
    caption/score/vqa): a ValueError naming `source`, its family and the families `task` (default: the role) needs."""
    what, allowed = ROLES[role]
    if family not in allowed:
        need = " or ".join(allowed)
        raise ValueError(f"{source} is a {family} model (a {family!r} checkpoint); {task or what} needs a {need} model")


def transfer_weights(model: nn.Module, sd: dict[str, Tensor]) -> dict[str, list[str]]:
    """Copy every key of `sd` that `model` has (shape-checked; ViT position embeddings resized); report the rest.

    This is how training starts a model of one family from another's checkpoint (a pretrain checkpoint becomes a
    captioner or a filter: its state dict holds both families' keys); the caller decides which missing keys matter.
    """
    own = model.state_dict()
    take: dict[str, Tensor] = {}
    skipped: list[str] = []
    for k, v in sd.items():
        if k not in own:
            continue
        if k.endswith("pos_embed") and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            v = interpolate_pos_embed(v, own[k].shape[1] - 1)
        if v.shape != own[k].shape:
            skipped.append(k)
            continue
        take[k] = v
    missing = [k for k in own if k not in take]
    model.load_state_dict(take, strict=False)
    return {"missing": missing, "shape_mismatch": skipped}


# -- the public API ---------------------------------------------------------------------------------------------------


def _find_tokenizer(path: Path, tokenizer_path: str | os.PathLike[str] | None) -> Path:
    if tokenizer_path is not None:
        return Path(tokenizer_path).expanduser()
    folder = path if path.is_dir() else path.parent
    for cand in (folder, folder / "tokenizer"):
        if any((cand / f).is_file() for f in TOKENIZER_FILES):
            return cand
    raise CheckpointError(
        f"no tokenizer for {path}: pass tokenizer_path= / --tokenizer (a folder with tokenizer files or a BERT "
        f"vocab.txt), or put vocab.txt / tokenizer.json next to the checkpoint"
    )


def _fit_tokenizer(
    cfg: BlipConfig, path: Path, tokenizer_path: str | os.PathLike[str] | None
) -> tuple[BlipConfig, Any]:
    """(config with the tokenizer's special ids, tokenizer); one CheckpointError naming both when they do not fit."""
    where = _find_tokenizer(path, tokenizer_path)
    try:
        tok = build_tokenizer(where)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tokenizer {where} for {path}: {e}") from None
    try:
        return cfg.with_tokenizer(tok), tok
    except ValueError as e:
        raise CheckpointError(
            f"tokenizer {where} does not fit checkpoint {path}: {e} (the tokenizer has ids the embedding lacks)"
        ) from None


def _folder_config(cfg_file: Path, family: str | None) -> tuple[BlipConfig, str]:
    """A folder's config.json -> (BlipConfig, "capfilt" | "transformers"), without reading any weights."""
    try:
        cfg_json = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file} is not JSON: {e}") from None
    try:
        if cfg_json.get("format") == FORMAT_TAG or ("vision" in cfg_json and "family" in cfg_json):
            cfg = BlipConfig.from_dict(cfg_json)
            return (cfg if family is None else _with_family(cfg, family)), "capfilt"
        if cfg_json.get("model_type") == "blip" or "vision_config" in cfg_json:
            return config_from_hf(cfg_json, family), "transformers"
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    raise CheckpointError(
        f"{cfg_file} is neither our config (family, vision, text) nor a transformers BLIP config (model_type blip)"
    )


def read_config(
    path_or_id: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    family: str | None = None,
) -> BlipConfig:
    """The BlipConfig `load` would build, with the special ids of the checkpoint's tokenizer, checked against it.

    Reads no weights for our folders and transformers folders (their config.json); a bare `.pth` is read whole, since
    its sizes come from the weights' shapes. Raises CheckpointError (a ValueError) with a one-line message when the
    checkpoint or its tokenizer is unreadable or they do not fit, FileNotFoundError for a missing path.
    """
    path = resolve(path_or_id)
    cfg_file = path / "config.json"
    if path.is_dir() and cfg_file.is_file():
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise CheckpointError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")
        cfg = _folder_config(cfg_file, family)[0]
    else:
        cfg = read_checkpoint(path, family)[0]
    return _fit_tokenizer(cfg, path, tokenizer_path)[0]


def load(
    path_or_id: str | os.PathLike[str],
    family: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
    keep_training_state: bool = False,
) -> nn.Module:
    """Load a BLIP model (BlipCaptioner | BlipRetrieval | BlipPretrain | BlipVQA) with `.config` and `.tokenizer`.

    family: build this family instead of the checkpoint's (e.g. "caption" from a pretraining checkpoint).
    image_size: run at this resolution; position embeddings are interpolated bicubically when it differs.
    tokenizer_path: the tokenizer, when none lies next to the checkpoint; it decides the special ids either way.
    keep_training_state: keep the momentum encoders and queues a retrieval checkpoint carries (fine-tuning, resuming
      training) instead of dropping them (inference); pretraining models always have them.
    """
    from blip.model import MODEL_CLASSES, BlipRetrieval

    path = resolve(path_or_id)
    cfg, sd, fmt = read_checkpoint(path, family)
    cfg, tok = _fit_tokenizer(cfg, path, tokenizer_path)
    if image_size is not None and image_size != cfg.vision.image_size:
        cfg = replace(cfg, vision=replace(cfg.vision, image_size=image_size))
    num_patches = cfg.vision.num_patches
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in sd and sd[key].shape[1] != num_patches + 1:
            sd[key] = interpolate_pos_embed(sd[key], num_patches)
    if cfg.family == "retrieval" and keep_training_state and any(k.startswith("visual_encoder_m.") for k in sd):
        model = BlipRetrieval(cfg, momentum=True)
    else:
        model = MODEL_CLASSES[cfg.family](cfg)
    load_state_dict_checked(
        model, sd, str(path), family_overridden=family is not None, from_transformers=fmt == "transformers"
    )
    model.tokenizer = tok
    return model.eval().to(device=device, dtype=dtype)


VISION_FILE = "vision.safetensors"  # a bare ViT state dict, as `capfilt warmup-vision` writes it


def load_vision_weights(vit: nn.Module, path_or_id: str | os.PathLike[str]) -> list[str]:
    """Start a ViT from pretrained weights, as the original pretraining starts from DeiT's ImageNet ViT
    (`blip_pretrain.py`: `visual_encoder.load_state_dict(deit["model"], strict=False)`).

    Reads a timm / DeiT state dict (`.pth` / `.safetensors`, `{"model": sd}` unwrapped), a folder with
    `vision.safetensors` (`capfilt warmup-vision`), or any BLIP checkpoint `blip.load` reads (its `visual_encoder`).
    Position embeddings are resized to the ViT's patch grid. Every ViT weight must be there with its shape; keys the
    ViT has no use for (a classifier `head`, DeiT's `dist_token`) are returned, not loaded.
    """
    path = resolve(path_or_id)

    def visual(full: dict[str, Tensor]) -> dict[str, Tensor]:  # a whole BLIP model's ViT, original names
        return {k[len("visual_encoder.") :]: v for k, v in full.items() if k.startswith("visual_encoder.")}

    if path.is_dir():
        sd = _read_file(path / VISION_FILE) if (path / VISION_FILE).is_file() else visual(read_checkpoint(path)[1])
    else:
        sd = _read_file(path)
        if any(k.startswith("vision_model.") for k in sd):  # a whole model, transformers names
            sd = visual(_hf_to_original(sd, path))
        elif any(k.startswith("visual_encoder.") for k in sd):  # a whole model, original names
            sd = visual(sd)
    own = vit.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        if sd["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
            sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], own["pos_embed"].shape[1] - 1)
    missing = [k for k in own if k not in sd]
    shared = {k: v for k, v in own.items() if k in sd}
    wrong = [f"{k} {tuple(sd[k].shape)} (ViT: {tuple(v.shape)})" for k, v in shared.items() if sd[k].shape != v.shape]
    problems = [f"missing {', '.join(missing[:4])}"] if missing else []
    problems += [f"shapes {', '.join(wrong[:4])}"] if wrong else []
    if problems:
        raise CheckpointError(f"{path} does not fit this ViT: {'; '.join(problems)}")
    vit.load_state_dict({k: sd[k] for k in own})
    return sorted(k for k in sd if k not in own)


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Our folder: config.json (special ids included) + model.safetensors (each shared storage once) + tokenizer."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    aliases = {k for g in _alias_groups(model) for k in g[1:]}  # safetensors refuses shared tensors: first name only
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in aliases}
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"format": FORMAT_TAG, **model.config.to_dict()}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save_pretrained(str(directory))
    return directory


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    family: str | None = None,
    image_size: int | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Any supported checkpoint (original .pth, transformers folder, hub id) -> our folder at `dst`."""
    model = load(src, family=family, image_size=image_size, tokenizer_path=tokenizer_path)
    save_pretrained(model, dst)
    return model


__all__ = [
    "CheckpointError",
    "convert_checkpoint",
    "load",
    "read_checkpoint",
    "read_config",
    "resolve",
    "save_pretrained",
]
