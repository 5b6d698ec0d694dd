"""Paper presets: one adapter setting per paper, every value with the place it comes from.

Chosen in a train config with `adapter.preset: NAME`; any other key of the adapter section
overrides the preset's value for that key. The preset is resolved into the AdapterConfig's
own fields before the config is built, so a saved adapter records the values it was built
with, not the preset's name (a preset edited later cannot change what an old adapter means).

    apply_preset({"preset": "mola", "rank": 16}, num_layers=30)
    # -> {"method": "mola", "rank": 16, "alpha": 16.0, "dropout": 0.05, ..., "allocation": {...}}

A preset also carries the papers' loss weights (`switch_coef`, ...): those are not adapter
fields but defaults for the train config's `objective` section (`preset_objective`), which
the objective section's own keys override the same way.

Training settings of the papers (learning rate, batch, schedule, optimizer) belong to the
train config's `optim` and `loop` sections, which a preset does not touch: each preset lists
them under `training` so they can be copied by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from moe_lora_jax.adapters.config import FFN_MODULES, LINEAR_MODULES, MOV_MODULES
from moe_lora_jax.objective.weights import OBJECTIVE_FIELDS
from moe_lora_jax.errors import MoeLoraError

MOV_REF = "for-ai/parameter-efficient-moe"
MOLA_REF = "GCYZSL/MoLA"
ALPHA_REF = "peijunallin/alphalora"
LORAMOE_REF = "Ablustrund/LoRAMoE"
MIXLORA_REF = "TUDB-Labs/MoE-PEFT"


@dataclass(frozen=True)
class Preset:
    """An adapter setting from one paper.

    values: AdapterConfig fields (an `allocation` recipe may say `experts_per_layer`, which
      becomes `total` = experts_per_layer * num_layers once the model is known), and objective
      weights (keys of OBJECTIVE_FIELDS: defaults for the train config's objective section).
    sources: for every key of `values`, where the value comes from (file path or paper section).
    training: the paper's optimizer / schedule / batch, for the train config (not applied).
    notes: what the preset does not reproduce, and why.
    """

    name: str
    paper: str
    reference: str
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    training: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        missing = sorted(set(self.values) - set(self.sources))
        if missing:  # a value without a source is a bug in this table
            raise AssertionError(f"preset {self.name}: no source for {missing}")

    def resolve(self, num_layers: int | None = None) -> dict[str, Any]:
        """The preset's values as AdapterConfig keyword arguments (allocation recipes sized to `num_layers`)."""
        out = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in self.values.items()}
        alloc = out.get("allocation")
        if isinstance(alloc, Mapping) and "experts_per_layer" in alloc:
            if num_layers is None:
                raise MoeLoraError(f"preset {self.name!r} sizes its allocation by the model's layers: pass num_layers")
            recipe = {k: v for k, v in alloc.items() if k != "experts_per_layer"}
            recipe["total"] = int(alloc["experts_per_layer"]) * int(num_layers)
            out["allocation"] = recipe
        return out


_MOLA_LORA = {
    "rank": 8,
    "alpha": 16.0,
    "dropout": 0.05,
    "target_modules": LINEAR_MODULES,
}
_MOLA_LORA_SRC = {
    "rank": f"{MOLA_REF} mola_training.py and README: lora_r 8 in every layer",
    "alpha": f"{MOLA_REF} mola_training.py and README: lora_alpha 16",
    "dropout": f"{MOLA_REF} mola_training.py and README: lora_dropout 0.05",
    "target_modules": f"{MOLA_REF} README: lora_target_modules q,k,v,o,gate,down,up_proj",
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="lora",
            paper="LoRA (Hu et al. 2021) with the per-module settings of the MoE-LoRA papers' code",
            reference=MOLA_REF,
            values={"method": "lora", **_MOLA_LORA},
            sources={"method": "plain LoRA, PEFT's LoraConfig (A kaiming-uniform, B zeros)", **_MOLA_LORA_SRC},
            training="AdamW lr 3e-4, 100 warmup steps, batch 128, cutoff 256 (MoLA mola_training.py / README)",
            notes=("the LoRA paper itself adapts q and v of GPT-3; these are the settings the MoE-LoRA "
                   "papers' code (MoLA, AlphaLoRA) gives each LoRA, so LoRA compares like for like",),
        ),
        Preset(
            name="molora",
            paper="MoLoRA (Zadouri et al. 2023, 'Pushing Mixture of Experts to the Limit')",
            reference=MOV_REF,
            values={
                "method": "molora", "rank": 4, "alpha": 16.0, "dropout": 0.0, "num_experts": 10,
                "target_modules": LINEAR_MODULES, "router_init": "normal", "router_init_range": 0.02,
                "lora_init": "normal",
            },
            sources={
                "method": f"{MOV_REF} configs/molora.gin: MoLoRa / MoLoRaAttention on attention and MLP",
                "rank": f"{MOV_REF} configs/molora.gin: rank = 4",
                "alpha": f"{MOV_REF} src/molora.py: alpha = 16, output scaled by alpha / rank",
                "dropout": f"{MOV_REF} src/molora.py: no dropout in MoLoRa",
                "num_experts": f"{MOV_REF} configs/molora.gin: num_experts = 10",
                "target_modules": f"{MOV_REF} configs/molora.gin: q, k, v, output of attention; both MLP linears (T5's wi/wo -> LLaMA's gate, up, down)",
                "router_init": f"{MOV_REF} configs/molora.gin: RouterWeights kernel_init normal, no bias",
                "router_init_range": f"{MOV_REF} configs/molora.gin: router_init stddev = 2e-2",
                "lora_init": f"{MOV_REF} src/molora.py: lora_init_A normal(stddev=2e-2), lora_init_B zeros",
            },
            training="Adafactor (decay_rate 0.8), constant lr 3e-4, batch 32, inputs 1024 / targets 256 "
                     "(configs/molora.gin, scripts/molora_train.sh)",
            notes=("the paper fine-tunes T5 (encoder-decoder) with Adafactor; here the same adapter sits on "
                   "LLaMA's seven linears and the optimizer is the train config's AdamW",),
        ),
        Preset(
            name="mov",
            paper="MoV (Zadouri et al. 2023, 'Pushing Mixture of Experts to the Limit')",
            reference=MOV_REF,
            values={
                "method": "mov", "num_experts": 30, "target_modules": MOV_MODULES, "mov_routing": "head",
                "router_init": "normal", "router_init_range": 0.02,
            },
            sources={
                "method": f"{MOV_REF} configs/mov.gin: IA3 vector mixtures (mov_scaling) with a soft router",
                "num_experts": f"{MOV_REF} configs/mov.gin: MoVAttention and MoV num_experts = 30",
                "target_modules": f"{MOV_REF} configs/mov.gin: k_conv, v_conv (attention) and MlpBlock intermediate_conv",
                "mov_routing": f"{MOV_REF} src/mov.py: MoVAttention vectors [heads, E, head_dim]; configs/mov.gin: the "
                               "attention router's kernel is [kv, E], one router applied to each head's slice",
                "router_init": f"{MOV_REF} configs/mov.gin: RouterWeights kernel_init normal, no bias",
                "router_init_range": f"{MOV_REF} configs/mov.gin: router_init stddev = 2e-2",
            },
            training="Adafactor (decay_rate 0.8), constant lr 3e-4, batch 32, inputs 1024 / targets 256 "
                     "(configs/mov.gin, scripts/mov_train.sh)",
            notes=("30 experts is the reference config's value; the paper also reports other expert counts",
                   "the scaling sits on k before RoPE (T5 has no RoPE); GQA models route their KV heads"),
        ),
        Preset(
            name="mola",
            paper="MoLA (Gao et al. 2024, 'Higher Layers Need More LoRA Experts'), MoLA-inverted-triangle 2468",
            reference=MOLA_REF,
            values={
                "method": "mola", **_MOLA_LORA, "top_k": 2,
                "allocation": {"method": "mola-2468", "experts_per_layer": 5}, "switch_coef": 0.0,
            },
            sources={
                "method": f"{MOLA_REF} src/mola_lora_hacked.py: Linear_MoE, top-k of a softmax router, renormalised",
                **_MOLA_LORA_SRC,
                "top_k": f"{MOLA_REF} README: top_k 2 in every layer",
                "allocation": f"{MOLA_REF} README: number_experts 2x8, 4x8, 6x8, 8x8 over 32 layers (2468, 5 per layer)",
                "switch_coef": f"{MOLA_REF} mola_training.py: obalance=False by default and the README's commands do not "
                               "set it (router_aux_loss_coef 0.001 in src/mola_modeling_llama_hacked.py applies only with it)",
            },
            training="AdamW lr 3e-4, 100 warmup steps, batch 128 (micro 8), 20 epochs on ScienceQA, cutoff 256 "
                     "(MoLA README, mola_training.py)",
            notes=("the library default objective.switch_coef for mola is 1e-3 (the coefficient MoLA's code uses when its "
                   "balance loss is on); the preset follows the released commands, which leave it off",),
        ),
        Preset(
            name="alphalora",
            paper="AlphaLoRA (Qing et al. 2024): MoLA with per-layer experts from PL_Alpha_Hill",
            reference=ALPHA_REF,
            values={
                "method": "mola", **_MOLA_LORA, "top_k": 2,
                "allocation": {"method": "alphalora", "experts_per_layer": 5, "beta": 2.5}, "switch_coef": 0.0,
            },
            sources={
                "method": f"{ALPHA_REF} src/mola_lora_hacked.py: MoLA's Linear_MoE (AlphaLoRA builds on MoLA's code)",
                "rank": f"{ALPHA_REF} run_all.sh: lora_r 8",
                "alpha": f"{ALPHA_REF} run_all.sh: lora_alpha 16",
                "dropout": f"{ALPHA_REF} run_all.sh: lora_dropout 0.05",
                "target_modules": f"{ALPHA_REF} run_all.sh: q,v,k,o,gate,down,up_proj",
                "top_k": f"{ALPHA_REF} expert_number.py: top_k 2, 1 where a layer has one expert",
                "allocation": f"{ALPHA_REF} expert_number.py: --target_sum 160 over 32 layers (5 per layer), --beta 2.5",
                "switch_coef": f"{ALPHA_REF} mola_training_mistral.py: obalance=False, run_all.sh does not set it",
            },
            training="AdamW lr 3e-4, 100 warmup steps, batch 128 (micro 8), 20 epochs, cutoff 256 (run_all.sh)",
            notes=("a layer given one expert routes top-1 in AlphaLoRA; that needs per-layer top-k in the "
                   "Allocation (a layer with fewer experts than top_k is refused without it)",),
        ),
        Preset(
            name="loramoe",
            paper="LoRAMoE (Dou et al. 2023)",
            reference=LORAMOE_REF,
            values={
                "method": "loramoe", "rank": 4, "alpha": 32.0, "dropout": 0.05, "num_experts": 8,
                "target_modules": FFN_MODULES,
            },
            sources={
                "method": f"{LORAMOE_REF} peft/tuners/lora.py: Linear with lora_route, dense softmax over lora_num experts",
                "rank": f"{LORAMOE_REF} run_loramoe.sh: lora_rank=4",
                "alpha": f"{LORAMOE_REF} run_loramoe.sh: lora_alpha=32",
                "dropout": f"{LORAMOE_REF} run_loramoe.sh: lora_dropout=0.05",
                "num_experts": f"{LORAMOE_REF} run_loramoe.sh: lora_nums=8",
                "target_modules": f"{LORAMOE_REF} run_loramoe.sh: lora_trainable=gate_proj,down_proj,up_proj",
            },
            training="lr 2e-4, cosine, warmup ratio 0.03, weight decay 0, 1 epoch, max length 1024 (run_loramoe.sh)",
            notes=("run_loramoe.sh sets blc_alpha=0.0 and blc_weight=0.0, which turns the localized balancing "
                   "constraint off; the preset keeps it on (objective.loramoe_delta, objective.loramoe_coef at the library "
                   "defaults) because the constraint is the paper's method; set objective.loramoe_coef: 0 to match the script",),
        ),
        Preset(
            name="mixlora",
            paper="MixLoRA (Li et al. 2024)",
            reference=MIXLORA_REF,
            values={
                "method": "mixlora", "rank": 16, "alpha": 32.0, "dropout": 0.05, "num_experts": 8, "top_k": 2,
                "target_modules": LINEAR_MODULES, "switch_coef": 1e-3, "router_init_range": 0.02,
                "router_jitter": 0.0,
            },
            sources={
                "method": f"{MIXLORA_REF} moe_peft/adapters/mixlora/model.py: routing_strategy mixlora",
                "rank": f"{MIXLORA_REF} templates/mixlora.json: r 16",
                "alpha": f"{MIXLORA_REF} templates/mixlora.json: lora_alpha 32",
                "dropout": f"{MIXLORA_REF} templates/mixlora.json: lora_dropout 0.05",
                "num_experts": f"{MIXLORA_REF} templates/mixlora.json: num_experts 8",
                "top_k": f"{MIXLORA_REF} templates/mixlora.json: top_k 2",
                "target_modules": f"{MIXLORA_REF} templates/mixlora.json: q,k,v,o,gate,down,up_proj all true",
                "switch_coef": f"{MIXLORA_REF} moe_peft/adapters/mixlora/config.py: router_aux_loss_coef default 0.001",
                "router_init_range": f"{MIXLORA_REF} moe_peft/adapters/mixlora/config.py: router_init_range 0.02 (mixlora)",
                "router_jitter": f"{MIXLORA_REF} moe_peft/adapters/mixlora/config.py: jitter_noise 0.0 (mixlora)",
            },
            training="AdamW, constant lr 2e-4, no warmup, batch 16 (micro 8), 2 epochs, cutoff 512 (templates/mixlora.json)",
        ),
        Preset(
            name="milora",
            paper="MiLoRA (Zhang et al. 2024, EMNLP Findings)",
            reference="paper only (no reference code read)",
            values={"method": "milora", "target_modules": LINEAR_MODULES},
            sources={
                "method": "Zhang et al. 2024 Sec. 3 and Fig. 1: each LoRA module of a layer is an expert, one "
                          "prompt-aware router per layer, routed once per prompt",
                "target_modules": "Zhang et al. 2024 Fig. 1: the seven linear modules of a LLaMA layer",
            },
            training="",
            notes=("the paper's number of activated modules (top_k), rank and router width were not readable from "
                   "this project's sources; they stay at the library defaults: set them from the paper",),
        ),
    )
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def get_preset(name: Any) -> Preset:
    if not isinstance(name, str) or name.strip().lower() not in PRESETS:
        raise MoeLoraError(f"unknown adapter preset {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name.strip().lower()]


def apply_preset(raw: Mapping[str, Any], num_layers: int | None = None) -> dict[str, Any]:
    """The adapter section with `preset` replaced by the preset's values; the section's own keys win."""
    out = dict(raw)
    if "preset" not in out:
        return out
    name = out.pop("preset")
    if name is None:
        return out
    values = get_preset(name).resolve(num_layers)
    return {**{k: v for k, v in values.items() if k not in OBJECTIVE_FIELDS}, **out}


def preset_objective(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The objective weights of the adapter section's preset ({} without one): defaults under the
    train config's `objective` section, whose own keys win."""
    name = raw.get("preset")
    if name is None:
        return {}
    return {k: v for k, v in get_preset(name).values.items() if k in OBJECTIVE_FIELDS}


def presets_as_dict() -> dict[str, Any]:
    """Every preset as plain JSON-ready data (for `moe-lora info --presets --json`)."""
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {
        p.name: {
            "paper": p.paper, "reference": p.reference,
            "values": {k: plain(v) for k, v in p.values.items() if k not in OBJECTIVE_FIELDS},
            "objective": {k: plain(v) for k, v in p.values.items() if k in OBJECTIVE_FIELDS},
            "sources": dict(p.sources), "training": p.training, "notes": list(p.notes),
        }
        for p in PRESETS.values()
    }


def format_presets() -> str:
    """A readable listing: one block per preset, one `key = <JSON value>  # source` line per value."""
    lines = []
    for p in PRESETS.values():
        lines.append(f"preset {p.name}: {p.paper} [{p.reference}]")
        for key, value in p.values.items():
            shown = json.dumps(list(value) if isinstance(value, tuple) else value)
            shown_key = f"objective.{key}" if key in OBJECTIVE_FIELDS else key
            lines.append(f"  {shown_key} = {shown}  # {p.sources[key]}")
        if p.training:
            lines.append(f"  training (set in optim/loop, not applied): {p.training}")
        for note in p.notes:
            lines.append(f"  note: {note}")
    lines.append("use one with `adapter.preset: NAME` in the train config; other adapter keys (and objective keys, "
                 "for its objective.* values) override its values")
    return "\n".join(lines)
