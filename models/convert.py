"""Load the papers' reference checkpoints: key conversion and config translation.

Reference repositories: LeapLabTHU/ENAT (ENAT `DiT`), LeapLabTHU/ImprovedNAT (AutoNAT `UViT`)
and the MaskGIT VQGAN port in their `taming/` folders. Conversion is strict: every reference
key must be mapped or listed below as dead, and every one of our keys must be produced with
the right shape; anything else raises `CheckpointMismatch` listing the offending keys.

Keys dropped on purpose:
- a `module.` prefix (DataParallel/DDP checkpoints) and any `position_ids` buffer;
- ENAT `prev_embedder.*`: an MLP built by the reference model and saved in every
  checkpoint, but never used by its forward pass (about 8.4M parameters in ENAT-L).
  ENAT's `TimestepEmbedder` is dead code too, but it is never instantiated, so no key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from enat.models.config import ENATConfig, NATConfig, VQGANConfig
from enat.models.enat import ENAT
from enat.models.errors import UserError
from enat.models.uvit import UViT
from enat.models.vqgan import VQGAN

StateDict = Mapping[str, Tensor]
Rule = tuple[str, str | Callable[[re.Match], str]]

ENAT_DEAD_KEYS = (r"prev_embedder\..*",)
# Reference module names inside a transformer block -> ours.
_ENAT_BLOCK_PARTS = {
    "attn.q": "attn.q",
    "attn.kv.A": "attn.memory_kv",
    "attn.kv.B": "attn.kv",
    "attn.proj": "attn.out",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "adaLN_modulation.1": "modulation",
}
_UVIT_BLOCK_PARTS = {
    "norm1": "attn_norm",
    "attn.q": "attn.q",  # after splitting the fused qkv projection
    "attn.kv": "attn.kv",
    "attn.proj": "attn.out",
    "norm2": "mlp_norm",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "skip_linear": "skip_proj",
}
_HEAD_RULES: list[Rule] = [
    (r"norm\.(weight|bias)", r"final_norm.\1"),
    (r"mlm_layer\.fc\.(weight|bias)", r"head.dense.\1"),
    (r"mlm_layer\.ln\.(weight|bias)", r"head.norm.\1"),
    (r"mlm_layer\.bias", "head.bias"),
]


class CheckpointMismatch(UserError, ValueError):
    """A reference state dict does not convert exactly onto our model."""


def _embedding_rules(reference: str, ours: str) -> list[Rule]:
    """Rules for a BERT-style embedding module (word + position + LayerNorm)."""
    return [
        (rf"{reference}\.word_embeddings\.weight", f"{ours}.table.weight"),
        (rf"{reference}\.position_embeddings\.weight", f"{ours}.positions"),
        (rf"{reference}\.LayerNorm\.(weight|bias)", rf"{ours}.norm.\1"),
    ]


def _block_rule(prefix: str, parts: Mapping[str, str], rename: Callable[[str], str]) -> Rule:
    """`<prefix><index>.<part>.<param>` -> `rename(index).<our part>.<param>`."""
    alternatives = "|".join(re.escape(part) for part in parts)
    pattern = rf"{prefix}({alternatives})\.(weight|bias)"
    return pattern, lambda m: f"{rename(m[1])}.{parts[m[2]]}.{m[3]}"


def _strip(state_dict: StateDict) -> dict[str, Tensor]:
    return {
        key.removeprefix("module."): value
        for key, value in state_dict.items()
        if key.split(".")[-1] != "position_ids"
    }


def _summary(items: list[str], limit: int = 12) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _rename(state_dict: StateDict, rules: list[Rule], dead: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Apply the first matching rule to every key; dead keys are dropped, others are errors."""
    converted: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        if any(re.fullmatch(pattern, key) for pattern in dead):
            continue
        for pattern, target in rules:
            match = re.fullmatch(pattern, key)
            if match:
                ours = match.expand(target) if isinstance(target, str) else target(match)
                if ours in converted:
                    raise CheckpointMismatch(f"two reference keys map to {ours} (the last is {key})")
                converted[ours] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointMismatch(f"unmapped reference keys: {_summary(unmapped)}")
    return converted


def _check_against(converted: dict[str, Tensor], model_class: type[nn.Module], config: Any) -> None:
    """Compare key sets and shapes with our model, built on the meta device (no memory)."""
    with torch.device("meta"):
        expected = {key: value.shape for key, value in model_class(config).state_dict().items()}
    problems = [f"missing {key}" for key in expected if key not in converted]
    problems += [f"unexpected {key}" for key in converted if key not in expected]
    problems += [
        f"{key} has shape {tuple(converted[key].shape)}, expected {tuple(shape)}"
        for key, shape in expected.items()
        if key in converted and converted[key].shape != shape
    ]
    if problems:
        raise CheckpointMismatch(f"{model_class.__name__} state dict mismatch: {_summary(problems)}")


def _flatten_head_bias(converted: dict[str, Tensor]) -> dict[str, Tensor]:
    # The reference stores the output bias as [1, 1, vocab]; ours is [vocab].
    if "head.bias" in converted:
        converted["head.bias"] = converted["head.bias"].reshape(-1)
    return converted


def convert_enat(state_dict: StateDict, config: ENATConfig) -> dict[str, Tensor]:
    """ENAT `DiT` state dict -> ours. The config is needed because the reference keeps
    encoder and decoder blocks in one list (`blocks.<i>`, encoder first)."""
    depth = config.encoder_depth

    def block(index: str) -> str:
        i = int(index)
        return f"encoder_blocks.{i}" if i < depth else f"decoder_blocks.{i - depth}"

    rules = [
        *_embedding_rules("x_embedder", "token_embed"),
        (r"y_embedder\.embedding_table\.weight", "class_embed.weight"),
        (r"prev_proj\.(norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"reuse_proj.\1.\2"),
        _block_rule(r"blocks\.(\d+)\.", _ENAT_BLOCK_PARTS, block),
        *_HEAD_RULES,
    ]
    converted = _flatten_head_bias(_rename(_strip(state_dict), rules, ENAT_DEAD_KEYS))
    _check_against(converted, ENAT, config)
    return converted


def _split_fused_qkv(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`attn.qkv` [3D, ...] -> `attn.q` [D, ...] and `attn.kv` [2D, ...]. The fused output
    axis is laid out (q|k|v, head, head_dim) and ours (k|v, head, head_dim), so it is a split."""
    out = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.*\.attn\.)qkv\.(weight|bias)", key)
        if match:
            width = value.shape[0] // 3
            out[f"{match[1]}q.{match[2]}"], out[f"{match[1]}kv.{match[2]}"] = value.split([width, 2 * width])
        else:
            out[key] = value
    return out


def convert_uvit(state_dict: StateDict, config: NATConfig) -> dict[str, Tensor]:
    """AutoNAT `UViT` state dict -> ours."""
    rules = [
        *_embedding_rules("token_emb", "token_embed"),
        *_embedding_rules("context_embed", "class_embed"),
        _block_rule(r"(in_blocks\.\d+|out_blocks\.\d+|mid_block)\.", _UVIT_BLOCK_PARTS, str),
        *_HEAD_RULES,
    ]
    converted = _flatten_head_bias(_rename(_split_fused_qkv(_strip(state_dict)), rules))
    _check_against(converted, UViT, config)
    return converted


def convert_vqgan(state_dict: StateDict, config: VQGANConfig) -> dict[str, Tensor]:
    """taming `VQModel` (vq-f16-jax architecture) state dict -> ours. The reference stores
    decoder levels by resolution (`up.<i>`, finest first); ours are in processing order."""
    last = len(config.channel_mult) - 1
    block_params = r"(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)"

    def block_part(name: str) -> str:
        return "shortcut" if name == "nin_shortcut" else name

    rules: list[Rule] = [
        (r"(encoder|decoder)\.conv_in\.(weight|bias)", r"\1.stem.\2"),
        (r"(encoder|decoder)\.norm_out\.(weight|bias)", r"\1.out_norm.\2"),
        (r"(encoder|decoder)\.conv_out\.(weight|bias)", r"\1.out_conv.\2"),
        (
            rf"(encoder|decoder)\.mid\.block_([12])\.{block_params}",
            lambda m: f"{m[1]}.mid.{int(m[2]) - 1}.{block_part(m[3])}.{m[4]}",
        ),
        (
            rf"encoder\.down\.(\d+)\.block\.(\d+)\.{block_params}",
            lambda m: f"encoder.levels.{m[1]}.{m[2]}.{block_part(m[3])}.{m[4]}",
        ),
        (
            rf"decoder\.up\.(\d+)\.block\.(\d+)\.{block_params}",
            lambda m: f"decoder.levels.{last - int(m[1])}.{m[2]}.{block_part(m[3])}.{m[4]}",
        ),
        (
            r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)",
            lambda m: f"decoder.upsamplers.{last - int(m[1])}.conv.{m[2]}",
        ),
        (r"quantize\.embedding\.weight", "quantizer.codebook.weight"),
    ]
    converted = _rename(_strip(state_dict), rules)
    _check_against(converted, VQGAN, config)
    return converted


# Reference constructor defaults, for arguments a config leaves out.
_ENAT_DEFAULTS = {
    "input_size": 32,
    "hidden_size": 1152,
    "num_heads": 16,
    "mlp_ratio": 4.0,
    "class_dropout_prob": 0.1,
    "num_classes": 1000,
    "codebook_size": 1024,
}
_UVIT_DEFAULTS = {
    "img_size": 16,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "qkv_bias": False,
    "skip": True,
    "codebook_size": 1024,
    "qk_scale": None,
    "num_classes": None,
}
# Arguments that do not change the token model (DiT leftovers, U-ViT's checkpointing switch).
_IGNORED_ARGS = {
    "enat": {"in_channels", "learn_sigma", "depth", "enc_dec"},
    "autonat_uvit": {"in_chans", "use_checkpoint", "norm_layer"},
}


def _reference_args(kind: str, args: Mapping[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = set(args) - set(defaults) - _IGNORED_ARGS.get(kind, set())
    if unknown:
        raise ValueError(f"unsupported {kind} constructor arguments: {', '.join(sorted(unknown))}")
    return {**defaults, **args}


def config_from_reference(
    kind: str, constructor_args: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> ENATConfig | NATConfig | VQGANConfig:
    """Our config for a reference model built with `constructor_args`.

    kind: "enat" (ENAT `DiT`; its encoder/decoder split `enc_dec` comes from the training
    args, given in `extra` or inside `constructor_args`), "autonat_uvit" or "maskgit_vqgan"
    (taming `VQModel` arguments: n_embed, embed_dim, ddconfig).
    """
    extra = dict(extra or {})
    if kind == "enat":
        args = _reference_args(kind, constructor_args, _ENAT_DEFAULTS)
        enc_dec = extra.get("enc_dec", args.get("enc_dec"))
        if not enc_dec:
            raise ValueError("ENAT needs enc_dec = [encoder_depth, decoder_depth] (args.enc_dec)")
        if args["class_dropout_prob"] <= 0:
            raise ValueError(
                "ENAT checkpoints without a null-class row (class_dropout_prob 0) are unsupported"
            )
        if float(args["mlp_ratio"]) != 4.0:
            # The reference's reuse projection is hard-wired to 4x; ours follows mlp_ratio.
            raise ValueError(f"ENAT with mlp_ratio {args['mlp_ratio']} is unsupported (only 4.0)")
        return ENATConfig(
            codebook_size=args["codebook_size"],
            grid_size=args["input_size"],
            width=args["hidden_size"],
            heads=args["num_heads"],
            mlp_ratio=float(args["mlp_ratio"]),
            num_classes=args["num_classes"],
            embed_dropout=0.1,
            cond_dropout=args["class_dropout_prob"],
            encoder_depth=enc_dec[0],
            decoder_depth=enc_dec[1],
        )
    if kind == "autonat_uvit":
        args = _reference_args(kind, constructor_args, _UVIT_DEFAULTS)
        if args["num_classes"] is None or not args["skip"] or args["qk_scale"] is not None:
            raise ValueError("AutoNAT UViT needs num_classes, skip=True and the default qk_scale")
        return NATConfig(
            codebook_size=args["codebook_size"],
            grid_size=args["img_size"],
            width=args["embed_dim"],
            heads=args["num_heads"],
            mlp_ratio=float(args["mlp_ratio"]),
            qkv_bias=args["qkv_bias"],
            # U-ViT builds depth // 2 in- and out-blocks; its num_classes counts the null class.
            depth=2 * (args["depth"] // 2),
            num_classes=args["num_classes"] - 1,
            embed_dropout=0.1,
            cond_dropout=0.15,  # AutoNAT's p_uncond
        )
    if kind == "maskgit_vqgan":
        dd = constructor_args["ddconfig"]
        if dd.get("double_z") or dd["z_channels"] != constructor_args["embed_dim"]:
            raise ValueError(
                "the MaskGIT VQGAN has no quant_conv: needs z_channels == embed_dim, no double_z"
            )
        # attn_resolutions is ignored: this architecture has no attention blocks.
        return VQGANConfig(
            codebook_size=constructor_args["n_embed"],
            code_dim=constructor_args["embed_dim"],
            base_channels=dd["ch"],
            channel_mult=tuple(dd["ch_mult"]),
            num_res_blocks=dd["num_res_blocks"],
            in_channels=dd["in_channels"],
            out_channels=dd["out_ch"],
            image_size=dd["resolution"],
            dropout=float(dd.get("dropout", 0.0)),
        )
    raise ValueError(f"unknown reference kind {kind!r}; expected one of {', '.join(REFERENCE_KINDS)}")


REFERENCE_KINDS: dict[str, tuple[Callable[..., dict[str, Tensor]], type[nn.Module]]] = {
    "enat": (convert_enat, ENAT),
    "autonat_uvit": (convert_uvit, UViT),
    "maskgit_vqgan": (convert_vqgan, VQGAN),
}


def load_reference_checkpoint(kind: str, state_dict: StateDict, config: Any) -> nn.Module:
    """Build our model for `config`, load a reference state dict into it, return it in eval mode."""
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"unknown reference kind {kind!r}; expected one of {', '.join(REFERENCE_KINDS)}")
    convert, model_class = REFERENCE_KINDS[kind]
    model = model_class(config)
    model.load_state_dict(convert(state_dict, config), strict=True)
    return model.eval()
