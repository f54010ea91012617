"""Each adapter variant is a small strategy object, in the style of peft's `tuners/lora/variants.py`.

A variant knows how to build its peft config, how its trained weights become a file (and back), how to load them
into a model, how they look in the kohya/LyCORIS layout, and which consumers load its files natively. The
training recipe, the file writer, the loader and the kohya converter only ever talk to this interface.

State dicts handled here are in peft's own key layout, relative to one model (UNet or text encoder) and without
the adapter name: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

#: Consumers named in `inspect` and the README table.
DIFFUSERS = "diffusers load_lora_weights"
OURS = "lora_dreambooth load_adapter"
KOHYA = "kohya/A1111/ComfyUI"
INITS = ("gaussian", "pissa", "olora")
#: Non-persistent buffers holding PiSSA/OLoRA's initial factors (they shifted the base weight; export subtracts them).
INITIAL_A, INITIAL_B = "lora_dreambooth_initial_A", "lora_dreambooth_initial_B"


@dataclass(frozen=True)
class AdapterVariant:
    """Plain LoRA (delta = B A * alpha / r); subclasses change the peft config, the layout or the loaders."""

    name: str = "lora"
    #: `pipe.load_lora_weights` reproduces the trained model exactly, per component (measured, see tests).
    diffusers_native_unet: bool = True
    diffusers_native_text_encoder: bool = True
    #: Module parameter name in peft -> in the kohya/LyCORIS file (LoRA: lora_A -> lora_down, ...).
    kohya_names: tuple[tuple[str, str], ...] = (("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight"))
    kohya_network_module: str = "networks.lora"

    # -- building ---------------------------------------------------------------------------------------------
    def peft_config(self, rank: int, alpha: float, target_modules: tuple[str, ...], init: str = "gaussian") -> Any:
        """The peft config for one model (UNet or text encoder)."""
        from peft import LoraConfig

        init_weights: Any = {"gaussian": True, "default": True}.get(init, init)
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                          init_lora_weights=init_weights, **self.lora_options())

    def lora_options(self) -> dict[str, Any]:
        """Extra `LoraConfig` keyword arguments of this variant."""
        return {}

    def matches_config(self, config: dict[str, Any]) -> bool:
        """Whether a saved peft config dict was built by this variant."""
        return _peft_type(config) == "LORA" and not config.get("use_dora") and not config.get("use_rslora")

    # -- saving -----------------------------------------------------------------------------------------------
    def export_state(self, model: torch.nn.Module, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
        """The trained adapter as (peft state dict, JSON-able peft config) that applies to the *untouched* base.

        PiSSA/OLoRA moved part of each base weight into the adapter's initial factors (W_res = W - s B0 A0); the
        exported delta is s (B A - B0 A0) = s [B | -B0] [A ; A0], a plain LoRA of rank 2r with the same scale.
        """
        from peft.utils import get_peft_model_state_dict

        config = model.peft_config[adapter_name]
        state = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name,
                                                                       save_embedding_layers=False).items()}
        config_dict = jsonable(config.to_dict())
        if str(config_dict.get("init_lora_weights")).lower() in ("pissa", "olora"):
            state, config_dict = self._subtract_initial_factors(model, state, config_dict)
        return state, config_dict

    def _subtract_initial_factors(self, model: torch.nn.Module, state: dict, config: dict) -> tuple[dict, dict]:
        state = dict(state)
        for name, module in model.named_modules():
            initial_a = getattr(module, INITIAL_A, None)
            if initial_a is None:
                continue
            a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            state[a_key] = torch.cat([state[a_key].float(), initial_a.float()], dim=0)
            state[b_key] = torch.cat([state[b_key].float(), -getattr(module, INITIAL_B).float()], dim=1)
        rank = int(config["r"])
        growth = math.sqrt(2.0) if config.get("use_rslora") else 2.0  # keeps alpha/r (or alpha/sqrt(r)) unchanged
        config = {**config, "r": 2 * rank, "lora_alpha": float(config["lora_alpha"]) * growth,
                  "init_lora_weights": True}
        return state, config

    def to_file_layout(self, state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
        """peft keys -> the keys of `component` in this variant's diffusers-layout file, one key style per component.

        diffusers 0.42.1 picks the key style of a whole component from a glance: the UNet loader converts only when
        its *first* key lacks ``lora_A``, the text-encoder loader only when some key holds ``lora_linear_layer``.
        `convert_state_dict_to_diffusers` renames attention layers alone, so a file mixing ``to_q.lora.down`` with
        ``conv_in.lora_A`` lost every attention adapter in `load_lora_weights`. Hence the UNet keeps peft's keys
        (what diffusers' own `save_lora_adapter` writes) and the text encoder uses ``lora_linear_layer.down/up``
        on every module (diffusers' generic text-encoder rule, which also covers fc1/fc2).
        """
        if component == "unet":
            return dict(state)
        return {_rename_lora_params(key, _PEFT_TO_TEXT_ENCODER_FILE): tensor for key, tensor in state.items()}

    def from_file_layout(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft keys of a diffusers-layout component, whatever key style (or mix) it was written in."""
        from diffusers.utils import convert_state_dict_to_peft

        if any("_lora.down" in k for k in state):  # diffusers' old attention-processor layout
            return convert_state_dict_to_peft(state)
        return {_rename_lora_params(key, _DIFFUSERS_FILE_TO_PEFT): tensor for key, tensor in state.items()}

    # -- loading ----------------------------------------------------------------------------------------------
    def load_component(self, model: torch.nn.Module, state: dict[str, torch.Tensor], config: dict[str, Any],
                       adapter_name: str) -> None:
        """Inject an adapter named `adapter_name` into `model` and set its weights, exactly (peft's own loader).

        The model is marked the way diffusers/transformers mark models that got adapters through their loaders,
        so `set_adapters`, `disable_lora`, `delete_adapters` and `unload_lora_weights` keep working.
        """
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        peft_config = peft_config_from_dict(config)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
            inject_adapter_in_model(peft_config, model, adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", None) or [])  # `state` holds adapter keys only
        if unexpected:
            raise ValueError(f"{len(unexpected)} adapter weight(s) match no layer, e.g. '{unexpected[0]}'")
        model._hf_peft_config_loaded = True

    # -- consumers --------------------------------------------------------------------------------------------
    def native_consumers(self, components: tuple[str, ...], layout: str) -> dict[str, str]:
        """Which consumers load a file of this variant natively: consumer -> 'yes', 'partly: why' or 'no: why'."""
        if layout == "kohya":
            return {DIFFUSERS: self._diffusers_kohya_verdict(), OURS: "yes", KOHYA: "yes (kohya LoRA layout)"}
        return {DIFFUSERS: self._diffusers_verdict(components), OURS: "yes",
                KOHYA: "no: convert it with `lora-dreambooth export --format kohya`"}

    def _diffusers_verdict(self, components: tuple[str, ...]) -> str:
        broken = [c for c in components if not getattr(self, f"diffusers_native_{c}", False)]
        if not broken:
            return "yes"
        if len(broken) == len(components):
            return f"no: diffusers cannot load {self.name}"
        return f"partly: {', '.join(broken)} loads inexactly ({self._inexact_reason()})"

    def _diffusers_kohya_verdict(self) -> str:
        return "yes"

    def _inexact_reason(self) -> str:
        return "unsupported"

    # -- kohya / LyCORIS layout -------------------------------------------------------------------------------
    def kohya_module_tensors(self, params: dict[str, torch.Tensor], config: dict[str, Any],
                             module: str) -> dict[str, torch.Tensor]:
        """One module's peft tensors -> kohya/LyCORIS tensors (names after the module prefix), with `alpha`."""
        out = {theirs: params[ours] for ours, theirs in self.kohya_names if ours in params}
        rank = int(params["lora_A.weight"].shape[0])
        out["alpha"] = torch.tensor(self.scaling(config, module, rank) * rank, dtype=torch.float32)
        return out

    def peft_module_tensors(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, float]:
        """The inverse: (peft tensors, rank, peft alpha) of one module read from a kohya/LyCORIS file."""
        params = {ours: tensors[theirs] for ours, theirs in self.kohya_names if theirs in tensors}
        rank = int(params["lora_A.weight"].shape[0])
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
        return params, rank, alpha

    def kohya_matches(self, suffixes: set[str]) -> bool:
        """Whether a kohya/LyCORIS module with these tensor names is of this variant."""
        return "lora_down.weight" in suffixes and "dora_scale" not in suffixes

    def config_from_modules(self, ranks: dict[str, int], alphas: dict[str, float],
                            tensor_names: set[str] = frozenset()) -> dict[str, Any]:
        """A peft config dict for imported modules (patterns only where modules differ)."""
        from peft import LoraConfig

        rank, alpha, patterns = _uniform_or_patterns(ranks, alphas)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(ranks), **patterns, **self.lora_options())
        return jsonable(config.to_dict())

    def scaling(self, config: dict[str, Any], module: str, rank: int) -> float:
        """peft's scale of one module: alpha / r (alpha / sqrt(r) with rsLoRA)."""
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


@dataclass(frozen=True)
class DoraVariant(AdapterVariant):
    """Weight-decomposed LoRA (DoRA): LoRA direction plus a learned magnitude vector per output."""

    name: str = "dora"
    diffusers_native_text_encoder: bool = False  # transformers' loader drops lora_magnitude_vector keys
    kohya_network_module: str = "lycoris.kohya"

    def lora_options(self) -> dict[str, Any]:
        return {"use_dora": True}

    def matches_config(self, config: dict[str, Any]) -> bool:
        return _peft_type(config) == "LORA" and bool(config.get("use_dora"))

    def _inexact_reason(self) -> str:
        return "its loader drops lora_magnitude_vector"

    def _diffusers_kohya_verdict(self) -> str:
        return "no: its SD loader drops dora_scale (plain LoRA result)"

    def kohya_module_tensors(self, params, config, module):
        out = super().kohya_module_tensors(params, config, module)
        out["dora_scale"] = params["lora_magnitude_vector"].reshape(-1, 1)  # LyCORIS wd_on_out layout: (out, 1)
        return out

    def peft_module_tensors(self, tensors):
        params, rank, alpha = super().peft_module_tensors(tensors)
        params["lora_magnitude_vector"] = tensors["dora_scale"].reshape(-1)
        return params, rank, alpha

    def kohya_matches(self, suffixes: set[str]) -> bool:
        return "lora_down.weight" in suffixes and "dora_scale" in suffixes


@dataclass(frozen=True)
class RsLoraVariant(AdapterVariant):
    """Rank-stabilised LoRA: scale alpha / sqrt(rank) instead of alpha / rank (needs the metadata to load right)."""

    name: str = "rslora"

    def lora_options(self) -> dict[str, Any]:
        return {"use_rslora": True}

    def matches_config(self, config: dict[str, Any]) -> bool:
        return _peft_type(config) == "LORA" and bool(config.get("use_rslora")) and not config.get("use_dora")

    def kohya_matches(self, suffixes: set[str]) -> bool:
        return False  # in the kohya layout the scale lives in `.alpha`: it reads back as plain LoRA


@dataclass(frozen=True)
class LycorisVariant(AdapterVariant):
    """Shared parts of LoHa and LoKr: peft tuners of their own; files keep peft's (= LyCORIS's) tensor names."""

    diffusers_native_unet: bool = False
    diffusers_native_text_encoder: bool = False
    kohya_network_module: str = "lycoris.kohya"
    peft_type: str = ""
    tensor_names: tuple[str, ...] = ()

    def peft_config(self, rank, alpha, target_modules, init="gaussian"):
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        return PEFT_TYPE_TO_CONFIG_MAPPING[self.peft_type](r=rank, alpha=alpha, target_modules=list(target_modules),
                                                           **self.lora_options())

    def matches_config(self, config: dict[str, Any]) -> bool:
        return _peft_type(config) == self.peft_type

    def to_file_layout(self, state, component):
        return dict(state)

    def from_file_layout(self, state):
        return dict(state)

    def kohya_matches(self, suffixes: set[str]) -> bool:
        return bool(suffixes & set(self.tensor_names))

    def scaling(self, config, module, rank):
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["alpha"]))
        return alpha / rank

    def config_from_modules(self, ranks, alphas, tensor_names=frozenset()):
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        rank, alpha, patterns = _uniform_or_patterns(ranks, alphas)
        config = PEFT_TYPE_TO_CONFIG_MAPPING[self.peft_type](r=rank, alpha=alpha, target_modules=sorted(ranks),
                                                             **patterns, **self.import_options(tensor_names))
        return jsonable(config.to_dict())

    def import_options(self, tensor_names: set[str]) -> dict[str, Any]:
        """Extra config keys an imported file needs to rebuild the same tensor shapes."""
        return {}


@dataclass(frozen=True)
class LohaVariant(LycorisVariant):
    """LoHa: Hadamard product of two low-rank products, delta = (w1a w1b) * (w2a w2b) * alpha / r."""

    name: str = "loha"
    peft_type: str = "LOHA"
    tensor_names: tuple[str, ...] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def native_consumers(self, components, layout):
        verdicts = super().native_consumers(components, layout)
        verdicts[DIFFUSERS] = "no: diffusers rejects LoHa (load_lora_weights and load_lora_adapter)"
        if layout == "kohya":
            verdicts[KOHYA] = "yes (LyCORIS layout; not run here)"
        return verdicts

    def kohya_module_tensors(self, params, config, module):
        out = {name: params[name] for name in self.tensor_names}
        rank = int(params["hada_w1_b"].shape[0])
        out["alpha"] = torch.tensor(self.scaling(config, module, rank) * rank, dtype=torch.float32)
        return out

    def peft_module_tensors(self, tensors):
        params = {name: tensors[name] for name in self.tensor_names}
        rank = int(params["hada_w1_b"].shape[0])
        return params, rank, float(tensors["alpha"]) if "alpha" in tensors else float(rank)


@dataclass(frozen=True)
class LokrVariant(LycorisVariant):
    """LoKr: Kronecker product of two (optionally low-rank) factors, delta = kron(w1, w2) * alpha / r."""

    name: str = "lokr"
    peft_type: str = "LOKR"
    tensor_names: tuple[str, ...] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def native_consumers(self, components, layout):
        verdicts = super().native_consumers(components, layout)
        verdicts[DIFFUSERS] = ("no: load_lora_weights rejects LoKr (pipe.unet.load_lora_adapter(..., prefix='unet') "
                               "loads the UNet part)")
        if layout == "kohya":
            verdicts[KOHYA] = "yes (LyCORIS layout; not run here)"
        return verdicts

    def kohya_module_tensors(self, params, config, module):
        # LyCORIS scales by alpha/dim only for low-rank factors (and by 1 for full ones); peft always by alpha/r.
        # Baking peft's scale into w1 and writing alpha = dim gives scale 1 in both conventions.
        out = {name: params[name] for name in self.tensor_names if name in params}
        first = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
        out[first] = out[first] * self.scaling(config, module, int(_pattern_value(config.get("rank_pattern") or {},
                                                                                   module, config["r"])))
        out["alpha"] = torch.tensor(float(self._decomposition_dim(out) or config["r"]), dtype=torch.float32)
        return out

    def peft_module_tensors(self, tensors):
        params = {name: tensors[name] for name in self.tensor_names if name in tensors}
        dim = self._decomposition_dim(params)
        scale = float(tensors["alpha"]) / dim if dim and "alpha" in tensors else 1.0
        # peft keeps w2 full exactly when r >= max(w2 dims) / 2; otherwise r is the w2 decomposition's rank.
        rank = dim if dim else int(max(params["lokr_w2"].shape))
        return params, rank, scale * rank

    @staticmethod
    def _decomposition_dim(params: dict[str, torch.Tensor]) -> int | None:
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in params:
                return int(params[key].shape[0])
        return None

    def import_options(self, tensor_names: set[str]) -> dict[str, Any]:
        return {"decompose_both": "lokr_w1_a" in tensor_names}


_VARIANTS: dict[str, Callable[[], AdapterVariant]] = {
    "lora": AdapterVariant,
    "dora": DoraVariant,
    "rslora": RsLoraVariant,
    "loha": LohaVariant,
    "lokr": LokrVariant,
}


def register_variant(name: str, factory: Callable[[], AdapterVariant]) -> None:
    """Make a variant available to `--variant NAME`."""
    _VARIANTS[name] = factory


def get_variant(name: str) -> AdapterVariant:
    """The strategy object for `name`; unknown names are a user error."""
    from lora_dreambooth.errors import UserInputError

    try:
        return _VARIANTS[name]()
    except KeyError:
        raise UserInputError(f"--variant '{name}' is not available; choose one of {', '.join(sorted(_VARIANTS))}") from None


def all_variants() -> list[AdapterVariant]:
    """Every registered variant, in registration order."""
    return [factory() for factory in _VARIANTS.values()]


def variant_for_config(config: dict[str, Any]) -> AdapterVariant:
    """The variant that built a saved peft config dict."""
    for variant in all_variants():
        if variant.matches_config(config):
            return variant
    raise ValueError(f"no adapter variant handles peft type {_peft_type(config)!r}")


def variant_for_kohya_module(suffixes: set[str]) -> AdapterVariant | None:
    """The variant of one kohya/LyCORIS module, from its tensor names (None when no variant reads it)."""
    for variant in all_variants():
        if variant.kohya_matches(suffixes):
            return variant
    return None


def peft_config_from_dict(config: dict[str, Any]) -> Any:
    """A peft config object from a saved dict; keys this peft version does not know are dropped."""
    import dataclasses

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[_peft_type(config)]
    known = {f.name for f in dataclasses.fields(cls)} - {"peft_type"}
    return cls(**{k: v for k, v in config.items() if k in known})


def remember_initial_factors(model: torch.nn.Module, adapter_name: str = "default") -> int:
    """Keep PiSSA/OLoRA's initial A0/B0 beside each layer (non-persistent: never in checkpoints or files)."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            module.register_buffer(INITIAL_A, module.lora_A[adapter_name].weight.detach().float().clone(),
                                   persistent=False)
            module.register_buffer(INITIAL_B, module.lora_B[adapter_name].weight.detach().float().clone(),
                                   persistent=False)
            count += 1
    return count


def jsonable(value: Any) -> Any:
    """Sets/tuples/enums to JSON-friendly values (peft configs hold sets and enums)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "value"):
        return jsonable(value.value)
    return str(value)


#: Parameter-name renames between peft's keys and diffusers-layout files ("module.<param>.weight" / ".bias").
_PEFT_TO_TEXT_ENCODER_FILE = ((".lora_A.", ".lora_linear_layer.down."), (".lora_B.", ".lora_linear_layer.up."))
_DIFFUSERS_FILE_TO_PEFT = ((".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."),
                           (".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."))


def _rename_lora_params(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """`key` with its first matching parameter name replaced (only the last occurrence: module names stay)."""
    for old, new in renames:
        head, found, tail = key.rpartition(old)
        if found:
            return head + new + tail
    return key


def _peft_type(config: dict[str, Any]) -> str:
    value = config.get("peft_type", "LORA")
    return str(getattr(value, "value", value)).upper()


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup for one module (full-name or suffix match)."""
    import re

    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key.lstrip('^')})$", module):
            return value
    return default


def _uniform_or_patterns(ranks: dict[str, int], alphas: dict[str, float]) -> tuple[int, float, dict[str, Any]]:
    """Most common rank/alpha, plus rank_pattern/alpha_pattern for the modules that differ."""
    from collections import Counter

    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    patterns: dict[str, Any] = {}
    rank_pattern = {f"^{m}": r for m, r in ranks.items() if r != rank}
    alpha_pattern = {f"^{m}": a for m, a in alphas.items() if a != alpha}
    if rank_pattern:
        patterns["rank_pattern"] = rank_pattern
    if alpha_pattern:
        patterns["alpha_pattern"] = alpha_pattern
    return rank, alpha, patterns
