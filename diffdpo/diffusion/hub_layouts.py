"""Random-weight model folders in the exact layout of the published hub repositories.

Users fetch a model with ``hf download <repo> --local-dir models/<name>`` and point
``model.name_or_path`` at that folder. This module writes a folder with the same sub-folder names, the same
``model_index.json`` and the same component configs as the repository publishes (facts carried under
``published/hub/<org>--<name>/``, their sources in ``published/hub/SOURCES.md``; UNet configs under
``published/unets/``, transformer configs in the repository's own folder), with random weights. With
``shrink=True`` the widths are cut down (channels, hidden sizes, layers, heads, vocabularies) consistently, so
that every cross-dimension still matches; every other published value is kept. Tokenizers are the real classes
over a small character vocabulary, saved under the real sub-folder names beside the published
``tokenizer_config.json`` / ``special_tokens_map.json``.

``shrink=False`` keeps the published sizes (for full-size benches: several GB of random weights).
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path
from typing import Any

import torch

PUBLISHED = Path(__file__).resolve().parent / "published"
HUB = PUBLISHED / "hub"

# repository -> model family of diffdpo.diffusion.models
PUBLISHED_REPOS: dict[str, str] = {
    "cvssp/audioldm-s-full-v2": "audioldm",
    "cvssp/audioldm-m-full": "audioldm",
    "cvssp/audioldm2": "audioldm2",
    "cvssp/audioldm2-music": "audioldm2",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
    "black-forest-labs/FLUX.1-dev": "flux",
}

# UNet configs another part of the project carries under published/unets/<name>.json, by family; a repository
# whose UNet differs from its family's (audioldm-m-full, audioldm2-music) carries its own hub/<repo>/unet/config.json.
_FAMILY_UNET = {"audioldm": "audioldm", "audioldm2": "audioldm2", "sd15": "sd15", "sdxl": "sdxl"}

# ------------------------------------------------------------------ published facts


def repo_dir(repo: str) -> Path:
    return HUB / repo.replace("/", "--")


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def published_model_index(repo: str) -> dict:
    return _read(repo_dir(repo) / "model_index.json")


def unet_config_path(repo: str) -> Path:
    own = repo_dir(repo) / "unet" / "config.json"
    return own if own.is_file() else PUBLISHED / "unets" / f"{_FAMILY_UNET[PUBLISHED_REPOS[repo]]}.json"


def published_files(repo: str) -> dict[str, dict]:
    """Every carried JSON file of ``repo`` by its path inside the repository (``unet/config.json`` included)."""
    if repo not in PUBLISHED_REPOS:
        raise ValueError(f"unknown repository {repo!r}; valid: {list(PUBLISHED_REPOS)}")
    root = repo_dir(repo)
    files = {p.relative_to(root).as_posix(): _read(p) for p in sorted(root.rglob("*.json"))}
    if "unet" in files["model_index.json"]:  # transformer repositories carry their transformer/config.json here
        files["unet/config.json"] = _read(unet_config_path(repo))
    return files


def _config_file(component: str, files: dict[str, dict]) -> str | None:
    for name in ("config.json", "scheduler_config.json", "preprocessor_config.json"):
        if f"{component}/{name}" in files:
            return f"{component}/{name}"
    return None


# ------------------------------------------------------------------ widths

# Shrunk sizes. Text widths differ between encoders so that a wrong wiring shows up as a shape error.
_CLIP = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}
_CLIP_2 = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}
_CLAP_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
_T5 = {"d_model": 24, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2}
_T5_SD3 = 64         # SD3 pads the two CLIP widths (16 + 32) up to the T5 width, so T5 must be the widest
_SD3_HEADS, _SD3_HEAD_DIM = 2, 8
_GPT2 = {"n_embd": 16, "n_layer": 1, "n_head": 2}
_PROJ = 16           # CLIP/CLAP projection_dim
_TIME_EMBED = 8      # SDXL addition_time_embed_dim
_BASE_CHANNELS = 8   # first UNet / VAE block; the others keep the published ratios
_NORM_GROUPS = 4
_HEAD_DIM = 4        # UNet attention: channels per head where the published config lists heads per block
_HIFIGAN_CHANNELS = 32  # 2 ** number of upsampling stages, so that the last stage keeps one channel


def _channels(published: list[int]) -> list[int]:
    first = published[0]
    out = []
    for c in published:
        if (c * _BASE_CHANNELS) % first:
            raise ValueError(f"block_out_channels {published}: {c} is not a multiple of {first}/{_BASE_CHANNELS}")
        out.append(c * _BASE_CHANNELS // first)
    return out


def _set(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    cfg[last] = value


def _unet_widths(files: dict[str, dict], family: str, comp: dict[str, dict]) -> dict[str, Any]:
    unet = files["unet/config.json"]
    blocks = _channels(list(unet["block_out_channels"]))
    w: dict[str, Any] = {"block_out_channels": blocks, "layers_per_block": 1, "norm_num_groups": _NORM_GROUPS}
    head = unet.get("attention_head_dim")
    if isinstance(head, (list, tuple)):
        w["attention_head_dim"] = [c // _HEAD_DIM for c in blocks]
    elif head is not None:
        w["attention_head_dim"] = 2
    layers = unet.get("transformer_layers_per_block")
    if isinstance(layers, (list, tuple)):
        w["transformer_layers_per_block"] = [1] * len(layers)
    elif layers is not None:
        w["transformer_layers_per_block"] = 1
    if family == "sd15":
        w["cross_attention_dim"] = comp["text_encoder"]["hidden_size"]
    elif family == "sdxl":
        w["cross_attention_dim"] = comp["text_encoder"]["hidden_size"] + comp["text_encoder_2"]["hidden_size"]
        w["addition_time_embed_dim"] = _TIME_EMBED
        w["projection_class_embeddings_input_dim"] = 6 * _TIME_EMBED + comp["text_encoder_2"]["projection_dim"]
    elif family == "audioldm":
        w["cross_attention_dim"] = list(blocks)  # AudioLDM cross-attends to its own width (no text states)
        w["projection_class_embeddings_input_dim"] = comp["text_encoder"]["projection_dim"]
    elif family == "audioldm2":  # each block: [None (self-attention), GPT-2 width, T5 width] as published
        to = {files["language_model/config.json"]["n_embd"]: comp["language_model"]["n_embd"],
              files["text_encoder_2/config.json"]["d_model"]: comp["text_encoder_2"]["d_model"], None: None}
        w["cross_attention_dim"] = [[to[d] for d in block] if isinstance(block, (list, tuple)) else to[block]
                                    for block in unet["cross_attention_dim"]]
    return w


def _transformer_widths(files: dict[str, dict], family: str, comp: dict[str, dict]) -> dict[str, Any]:
    """SD3 / Flux transformer: fewer layers and heads; text widths follow the shrunk encoders."""
    if family == "sd3":  # pooled = both CLIP projections concatenated; context = T5 width
        return {"num_layers": 2, "num_attention_heads": _SD3_HEADS, "attention_head_dim": _SD3_HEAD_DIM,
                "caption_projection_dim": _SD3_HEADS * _SD3_HEAD_DIM,
                "joint_attention_dim": comp["text_encoder_3"]["d_model"],
                "pooled_projection_dim": sum(comp[n]["projection_dim"] for n in ("text_encoder", "text_encoder_2"))}
    # Flux: attention_head_dim stays 128, the sum of the rotary axes (16, 56, 56) the config does not list
    return {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 1,
            "joint_attention_dim": comp["text_encoder_2"]["d_model"],
            "pooled_projection_dim": comp["text_encoder"]["hidden_size"]}


def check_published_dimensions(repo: str) -> None:
    """The cross-dimensions the shrinking keeps consistent hold in the published facts themselves."""

    def require(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{repo}: published facts disagree: {what}")

    files, family = published_files(repo), PUBLISHED_REPOS[repo]
    vae = files["vae/config.json"]
    if family in ("sd3", "flux"):
        _check_transformer_dimensions(files, family, vae, require)
        return
    unet = files["unet/config.json"]
    require(vae["latent_channels"] == unet["in_channels"] == unet["out_channels"], "VAE latents vs UNet channels")
    if family == "sd15":
        te = files["text_encoder/config.json"]
        require(unet["cross_attention_dim"] == te["hidden_size"], "UNet cross_attention_dim vs text width")
    elif family == "sdxl":
        te, te2 = files["text_encoder/config.json"], files["text_encoder_2/config.json"]
        require(unet["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"], "UNet cross_attention_dim")
        time_ids = 6 * unet["addition_time_embed_dim"]  # original size, crop offset, target size
        require(unet["projection_class_embeddings_input_dim"] == time_ids + te2["projection_dim"],
                "UNet projection_class_embeddings_input_dim vs time ids + pooled text")
    elif family == "audioldm":
        te = files["text_encoder/config.json"]
        require(list(unet["cross_attention_dim"]) == list(unet["block_out_channels"]), "UNet cross_attention_dim")
        require(unet["projection_class_embeddings_input_dim"] == te["projection_dim"], "UNet class embedding input")
        down = 2 ** (len(vae["block_out_channels"]) - 1)
        require(files["vocoder/config.json"]["model_in_dim"] % down == 0, "mel bins vs VAE downsampling")
    elif family == "audioldm2":
        gpt, t5 = files["language_model/config.json"], files["text_encoder_2/config.json"]
        proj, clap = files["projection_model/config.json"], files["text_encoder/config.json"]
        dims = {d for block in unet["cross_attention_dim"] for d in block}
        require(dims <= {None, gpt["n_embd"], t5["d_model"]}, f"UNet cross_attention_dim {dims}")
        require(proj["text_encoder_dim"] == clap["projection_dim"] == clap["audio_config"]["projection_dim"],
                "projection model vs CLAP projection_dim")
        require(proj["text_encoder_1_dim"] == t5["d_model"], "projection model vs T5 width")
        require(proj["langauge_model_dim"] == gpt["n_embd"], "projection model vs GPT-2 width")


def _check_transformer_dimensions(files: dict[str, dict], family: str, vae: dict, require) -> None:
    tr = files["transformer/config.json"]
    if family == "sd3":
        te, te2, t5 = (files[f"{n}/config.json"] for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
        require(vae["latent_channels"] == tr["in_channels"] == tr["out_channels"], "VAE latents vs transformer")
        require(tr["pooled_projection_dim"] == te["projection_dim"] + te2["projection_dim"], "pooled CLIP width")
        require(tr["joint_attention_dim"] == t5["d_model"] >= te["hidden_size"] + te2["hidden_size"],
                "joint_attention_dim vs T5 width (the CLIP states are zero-padded up to it)")
        require(tr["caption_projection_dim"] == tr["num_attention_heads"] * tr["attention_head_dim"],
                "caption_projection_dim vs the transformer width")
    else:  # flux: 2x2 patches of latents packed into the channel dimension
        te, t5 = files["text_encoder/config.json"], files["text_encoder_2/config.json"]
        require(tr["in_channels"] == 4 * vae["latent_channels"], "transformer in_channels vs 2x2-packed latents")
        require(tr["pooled_projection_dim"] == te["hidden_size"], "pooled CLIP width")
        require(tr["joint_attention_dim"] == t5["d_model"], "joint_attention_dim vs T5 width")
        require(tr["attention_head_dim"] == 16 + 56 + 56, "attention_head_dim vs the rotary axes (16, 56, 56)")


def shrunk_widths(repo: str, vocab_sizes: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """``{component: {dotted config key: shrunk value}}`` — the only values ``build_from_published`` changes.

    ``vocab_sizes`` (tokenizer lengths by text-encoder component) fills the ``vocab_size`` entries; without it
    they are reported as ``None`` (the key list is what matters to callers comparing configs)."""
    files, family = published_files(repo), PUBLISHED_REPOS[repo]
    vocab = vocab_sizes or {}
    comp: dict[str, dict[str, Any]] = {}
    index = published_model_index(repo)
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        cls, path = entry[1], _config_file(name, files)
        cfg = files.get(path) if path else None
        w: dict[str, Any] = {}
        if cls in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            w = dict(_CLIP_2 if name == "text_encoder_2" else _CLIP)
            w["projection_dim"] = w["hidden_size"] if cls == "CLIPTextModelWithProjection" else _PROJ
            w["vocab_size"] = vocab.get(name)
        elif cls == "StableDiffusionSafetyChecker":
            w = {"projection_dim": _PROJ}
            for sub in ("text_config", "text_config_dict", "vision_config", "vision_config_dict"):
                for k, v in _CLIP.items():
                    if k in cfg.get(sub, {}):
                        w[f"{sub}.{k}"] = v
            w["text_config.vocab_size"] = vocab.get("tokenizer")
        elif cls == "ClapTextModelWithProjection":
            w = dict(_CLAP_TEXT, projection_dim=_PROJ, projection_hidden_size=_CLAP_TEXT["hidden_size"],
                     fusion_hidden_size=_CLAP_TEXT["hidden_size"], vocab_size=vocab.get(name))
        elif cls == "ClapModel":
            w = {"projection_dim": _PROJ, "text_config.vocab_size": vocab.get(name)}
            w.update({f"text_config.{k}": v for k, v in _CLAP_TEXT.items()})
            n = len(cfg["audio_config"]["depths"])
            w.update({"audio_config.patch_embeds_hidden_size": 8, "audio_config.depths": [1] * n,
                      "audio_config.num_attention_heads": [1] * n, "audio_config.hidden_size": 8 * 2 ** (n - 1),
                      "audio_config.projection_dim": _PROJ})
        elif cls == "T5EncoderModel":
            w = dict(_T5, vocab_size=vocab.get(name))
            if family == "sd3":
                w["d_model"] = _T5_SD3
        elif cls in ("GPT2Model", "GPT2LMHeadModel"):
            w = dict(_GPT2)  # vocab_size kept: bos/eos ids (50256) must stay inside it; GPT-2 only reads embeddings
        elif cls == "SpeechT5HifiGan":
            if 2 ** len(cfg["upsample_rates"]) > _HIFIGAN_CHANNELS:
                raise ValueError(f"{repo}: more upsampling stages than the shrunk vocoder has channels for")
            w = {"upsample_initial_channel": _HIFIGAN_CHANNELS}
        elif cls == "AutoencoderKL":
            w = {"block_out_channels": _channels(cfg["block_out_channels"]), "layers_per_block": 1,
                 "norm_num_groups": _NORM_GROUPS}
        comp[name] = w
    if family == "audioldm2":
        comp["projection_model"] = {"text_encoder_dim": _PROJ, "text_encoder_1_dim": _T5["d_model"],
                                    "langauge_model_dim": _GPT2["n_embd"]}
    if "transformer" in index:
        comp["transformer"] = _transformer_widths(files, family, comp)
    else:
        comp["unet"] = _unet_widths(files, family, comp)
    return comp


# ------------------------------------------------------------------ tokenizers (real classes, tiny vocabularies)

_CHARS = string.ascii_lowercase + string.digits

# Tokenizer folders of the published repositories also hold tokenizer.json (the fast-tokenizer file) for the
# audio repositories only; the Stable Diffusion ones hold vocab.json + merges.txt alone (see SOURCES.md).
_TOKENIZER_JSON = {"audioldm": True, "audioldm2": True, "sd15": False, "sdxl": False, "sd3": False, "flux": False}


def _bpe_vocab(words: dict[str, int], folder: Path) -> None:
    (folder / "vocab.json").write_text(json.dumps(words), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def _clip_tokenizer(max_length: int, folder: Path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS + "!":  # "!" is SDXL tokenizer_2's pad token
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    _bpe_vocab(vocab, folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _roberta_tokenizer(max_length: int, folder: Path):
    from transformers import RobertaTokenizer

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "\u0120"])}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab["\u0120" + c] = len(vocab)
    _bpe_vocab(vocab, folder)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer(max_length: int, folder: Path):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -2.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


_TOKENIZERS = {"CLIPTokenizer": _clip_tokenizer, "RobertaTokenizerFast": _roberta_tokenizer,
               "RobertaTokenizer": _roberta_tokenizer, "T5TokenizerFast": _t5_tokenizer, "T5Tokenizer": _t5_tokenizer}


def _write_tokenizer(cls_name: str, folder: Path, tok_cfg: dict, special: dict, tokenizer_json: bool) -> None:
    """A tiny tokenizer of the real class in ``folder`` beside the published tokenizer_config.json and
    special_tokens_map.json. T5 is written as tokenizer.json only (a SentencePiece model file cannot be made
    without training one)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = _TOKENIZERS[cls_name](int(tok_cfg["model_max_length"]), folder)
    if tokenizer_json or cls_name.startswith("T5"):
        tok.save_pretrained(folder)
    for fname, content in (("tokenizer_config.json", tok_cfg), ("special_tokens_map.json", special)):
        (folder / fname).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ building


def _overlay(saved: dict, published: dict, widths: dict[str, Any]) -> dict:
    """``saved`` with every published key at its published value, except the (shrunk) width keys."""
    out = copy.deepcopy(saved)
    flat_w = set(widths)

    def walk(dst: dict, src: dict, prefix: str) -> None:
        for k, v in src.items():
            key = f"{prefix}{k}"
            if key in flat_w:
                continue
            if isinstance(v, dict) and isinstance(dst.get(k), dict) and any(w.startswith(key + ".") for w in flat_w):
                walk(dst[k], v, key + ".")
            else:
                dst[k] = copy.deepcopy(v)

    walk(out, published, "")
    for key, value in widths.items():
        _set(out, key, value)
    return out


def _rewrite(path: Path, published: dict, widths: dict[str, Any]) -> None:
    path.write_text(json.dumps(_overlay(_read(path), published, widths), indent=2) + "\n", encoding="utf-8")


def _with_widths(published: dict, widths: dict[str, Any]) -> dict:
    cfg = copy.deepcopy(published)
    for key, value in widths.items():
        _set(cfg, key, value)
    return cfg


def _transformers_config(cls_name: str, cfg: dict):
    import transformers

    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "_commit_hash", "transformers_version")}
    if cls_name == "StableDiffusionSafetyChecker":
        cfg = {k: v for k, v in cfg.items() if not k.endswith("_config_dict")}
        return transformers.CLIPConfig.from_dict(cfg)
    model_cls = getattr(transformers, cls_name)
    return model_cls.config_class.from_dict(cfg)


def _build_component(name: str, lib: str, cls_name: str, cfg: dict | None, folder: Path):
    """Instantiate ``cls_name`` (random weights) from ``cfg`` and save it under ``folder``."""
    if lib in ("diffusers", "audioldm2", "stable_diffusion") and cls_name != "StableDiffusionSafetyChecker":
        import diffusers

        getattr(diffusers, cls_name).from_config(cfg).save_pretrained(folder)
        return
    if cls_name == "StableDiffusionSafetyChecker":
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        StableDiffusionSafetyChecker(_transformers_config(cls_name, cfg)).save_pretrained(folder)
        return
    import transformers

    config = _transformers_config(cls_name, cfg)
    if "max_new_tokens" in cfg:  # AudioLDM2's language model: generated length read from the model config
        config.max_new_tokens = cfg["max_new_tokens"]
    getattr(transformers, cls_name)(config).save_pretrained(folder)


def build_from_published(repo: str, path: str | Path, shrink: bool = True, seed: int = 0) -> Path:
    """Write ``repo``'s layout at ``path`` with random weights (see the module docstring); returns ``path``."""
    if repo not in PUBLISHED_REPOS:
        raise ValueError(f"unknown repository {repo!r}; valid: {list(PUBLISHED_REPOS)}")
    import transformers

    check_published_dimensions(repo)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files, index = published_files(repo), published_model_index(repo)
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}

    # tokenizers first: their lengths are the shrunk vocabularies
    vocab_sizes: dict[str, int] = {}
    for name, (lib, cls_name) in components.items():
        if cls_name not in _TOKENIZERS:
            continue
        _write_tokenizer(cls_name, path / name, files[f"{name}/tokenizer_config.json"],
                         files[f"{name}/special_tokens_map.json"], _TOKENIZER_JSON[PUBLISHED_REPOS[repo]])
        size = len(getattr(transformers, cls_name).from_pretrained(path / name))
        encoder = name.replace("tokenizer", "text_encoder")
        vocab_sizes[encoder] = vocab_sizes[name] = size

    widths = shrunk_widths(repo, vocab_sizes) if shrink else {}
    for i, (name, (lib, cls_name)) in enumerate(components.items()):
        if cls_name in _TOKENIZERS:
            continue
        rel = _config_file(name, files)
        published = files[rel]
        w = widths.get(name, {})
        out = path / name
        if rel.endswith("preprocessor_config.json"):  # image / audio feature extractors: no weights, no widths
            getattr(transformers, cls_name)(**{k: v for k, v in published.items()
                                              if k not in ("feature_extractor_type", "image_processor_type")}
                                           ).save_pretrained(out)
        else:
            torch.manual_seed(seed + i)
            _build_component(name, lib, cls_name, _with_widths(published, w), out)
        _rewrite(out / Path(rel).name, published, w)
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path
