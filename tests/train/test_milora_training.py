"""MiLoRA in training: the router reads the prompt only in the train and eval steps, the train loop's
validation loss equals `moe-lora eval --kind perplexity` of the saved adapter (every method), balance
terms on the prompt-level router, coefficients that cannot apply, and the router-activation ablations."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, init_adapter, randomize, tiny_base

from moe_lora_jax import LlamaForCausalLM
from moe_lora_jax.adapters import AdapterConfig
from moe_lora_jax.adapters.config import METHODS
from moe_lora_jax.objective import COEF_METHODS, Objective, legacy_objective, resolve_objective
from moe_lora_jax.adapters.layers import RATIONAL_GELU_DEN, RATIONAL_GELU_NUM, pool, rational, router_activation
from moe_lora_jax.errors import MoeLoraError
from moe_lora_jax.losses import cross_entropy, milora_prompt_balance, router_stats, total_loss
from moe_lora_jax.train.state import TrainState
from moe_lora_jax.train.step import make_eval_step, make_train_step


# ----------------------------------------------------------------------------- prompt-only routing in the steps
def _capture(logits, batch, inter, ac):
    """A loss_fn that also returns what must not depend on the response: prompt-position logits and MiLoRA's routing."""
    loss, metrics = total_loss(logits, batch, inter, ac)
    prompt = batch["prompt_mask"] if "prompt_mask" in batch else batch["attention_mask"] * (1 - batch["loss_mask"])
    metrics["prompt_logits"] = jnp.where(prompt[..., None].astype(bool), logits, 0.0)
    metrics["routing"] = inter["milora_routing"][0]
    return loss, metrics


def _milora_batch():
    rng = np.random.default_rng(3)
    B, L = 3, 14
    ids = rng.integers(3, TINY.vocab_size, size=(B, L)).astype(np.int32)
    attn, loss, prompt = (np.zeros((B, L), np.int32) for _ in range(3))
    for row, (p, n) in enumerate([(5, 14), (7, 11), (4, 9)]):  # prompt length, row length (right padding)
        attn[row, :n], prompt[row, :p], loss[row, p:n] = 1, 1, 1
    other = ids.copy()
    other[loss.astype(bool)] = rng.integers(3, TINY.vocab_size, size=int(loss.sum()))  # another response
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "prompt_mask": prompt}
    return batch, dict(batch, input_ids=other)


def test_train_and_eval_steps_route_milora_on_the_prompt_only():
    """Changing only response tokens leaves MiLoRA's routing and the prompt-position logits bit-identical
    in the train step and the eval step (before the fix both pooled the response too)."""
    config, params = tiny_base(TINY.replace(num_hidden_layers=1))
    ac = AdapterConfig(method="milora", rank=4, top_k=2, milora_router_dim=16)
    adapter = randomize(init_adapter(config, ac), scale=0.3)
    model = LlamaForCausalLM(config, ac)
    batch, other = _milora_batch()

    step = jax.jit(make_train_step(model, ac, optax.sgd(0.0), log_routing=False, loss_fn=_capture))
    state = TrainState.create(adapter, optax.sgd(0.0))
    _, m1 = step(state, params, batch)
    _, m2 = step(state, params, other)
    assert np.asarray(m1["ce"]) != np.asarray(m2["ce"])  # the response did change
    np.testing.assert_array_equal(np.asarray(m1["routing"]), np.asarray(m2["routing"]))
    np.testing.assert_array_equal(np.asarray(m1["prompt_logits"]), np.asarray(m2["prompt_logits"]))

    captured = []

    def eval_loss(logits, batch, inter, ac):  # make_eval_step returns ce_sum/tokens/loss only: capture on the side
        loss, metrics = _capture(logits, batch, inter, ac)
        jax.debug.callback(lambda r, l: captured.append((r, l)), metrics["routing"], metrics["prompt_logits"])
        return loss, metrics

    eval_step = jax.jit(make_eval_step(model, ac, loss_fn=eval_loss))
    without = {k: v for k, v in batch.items() if k != "prompt_mask"}  # falls back to attention & ~loss_mask
    for b1, b2 in [(batch, other), (without, {k: v for k, v in other.items() if k != "prompt_mask"})]:
        captured.clear()
        eval_step(adapter, params, b1)
        eval_step(adapter, params, b2)
        (r1, l1), (r2, l2) = captured
        np.testing.assert_array_equal(np.asarray(r1), np.asarray(r2))
        np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
    # and the routing really reads the prompt: a different prompt token moves it
    changed = dict(batch, input_ids=batch["input_ids"].copy())
    changed["input_ids"][:, 1] = 7
    captured.clear()
    eval_step(adapter, params, batch)
    eval_step(adapter, params, changed)
    assert np.abs(np.asarray(captured[0][0]) - np.asarray(captured[1][0])).max() > 1e-4


# ----------------------------------------------------------------------------- validation loss == eval perplexity
@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory, smollm2):
    """A random 1-layer LLaMA with SmolLM2's tokenizer (one layer: four compilations per method are the cost),
    and small train / validation files (two tasks, so LoRAMoE's binary task types exist)."""
    from conftest import make_hf_llama

    root = tmp_path_factory.mktemp("milora_train")
    d = root / "model"
    make_hf_llama(d, vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=2, bos_token_id=1,
                  eos_token_id=2)
    smollm2[2].save_pretrained(d)
    rng = np.random.default_rng(0)
    words = "red blue green cat dog sun moon tree river stone".split()

    def rows(n):
        return [{"instruction": " ".join(rng.choice(words, size=int(rng.integers(2, 9)))),
                 "output": " ".join(rng.choice(words, size=int(rng.integers(1, 6)))), "task": "ab"[i % 2]}
                for i in range(n)]

    for name, n in (("train", 8), ("validation", 6)):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows(n)))
    return root


def _method_options(method: str) -> list[str]:
    return {
        "lora": [], "molora": ["adapter.num_experts=2"], "mov": ["adapter.num_experts=2"],
        "mola": ["adapter.num_experts=2", "adapter.top_k=1"], "loramoe": ["adapter.num_experts=2", "data.world_knowledge_tasks=[a]"],
        "mixlora": ["adapter.num_experts=2", "adapter.top_k=1"], "milora": ["adapter.top_k=2", "adapter.milora_router_dim=8"],
    }[method]


@pytest.mark.parametrize("method", METHODS)
def test_validation_loss_equals_eval_perplexity_of_the_saved_adapter(tiny_run_dir, tmp_path, method, capsys):
    from moe_lora_jax.cli import main
    from moe_lora_jax.train.config import load_config
    from moe_lora_jax.train.loop import train

    root = tiny_run_dir
    config = load_config(None, [
        f"model.path={root / 'model'}", f"output_dir={tmp_path / 'run'}", f"data.train={root / 'train.jsonl'}",
        f"data.validation={root / 'validation.jsonl'}", "data.template=chat", "data.batching=fixed", "data.max_len=64",
        "loop.steps=3", "loop.global_batch=4", "loop.log_every=3", "loop.eval_every=3", "checkpoint.every=3",
        "checkpoint.async_save=false", f"adapter.method={method}", "adapter.rank=2", "optim.lr=5e-2",
        "optim.warmup_steps=0", *_method_options(method),
    ])
    result = train(config, progress=False)
    val = result.evals[-1]["eval/loss"]
    assert result.evals[-1]["step"] == 3 and val != result.evals[0]["eval/loss"]  # the adapter was trained
    out = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(root / "model"), "--adapter", str(result.adapter_dir), "--data",
                 str(root / "validation.jsonl"), "--kind", "perplexity", "--template", "chat", "--json", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    got = json.loads(out.read_text())
    assert got["n"] == 6
    print(f"{method}: validation loss {val!r}, eval nll/token {got['nll_per_token']!r}, "
          f"relative difference {abs(val - got['nll_per_token']) / abs(val):.2e}")
    # measured: <= 1.3e-7 relative for every method (0 for mola); MiLoRA pooling the response too in training gave 1.5e-4
    assert got["nll_per_token"] == pytest.approx(val, rel=1e-6), (method, val, got["nll_per_token"])


# ----------------------------------------------------------------------------- balance terms on the prompt router
def _milora_intermediates(logits_by_layer):
    tree = {"milora_routing": (jnp.zeros((1,)),)}
    for i, x in enumerate(logits_by_layer):
        p = jax.nn.softmax(jnp.asarray(x), -1)
        tree[f"layers_{i}"] = {"milora_router": {"milora_logits": (jnp.asarray(x),), "milora_gates": (p,)}}
    return {"intermediates": tree}


def test_balance_terms_apply_to_milora_prompt_routers_per_prompt():
    """z-loss, importance and Switch (coefficients that were ignored for MiLoRA) are taken over prompts,
    counting only rows that hold tokens; each matches a by-hand numpy value."""
    B, L, V, M, k = 4, 5, 11, 7, 2
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(B, L, V)).astype(np.float32))
    ids = jnp.asarray(rng.integers(0, V, size=(B, L)))
    attn = np.ones((B, L), np.int32)
    attn[3] = 0  # an empty filler row: it must not count
    layers = [rng.normal(size=(B, M)).astype(np.float32) * 2 for _ in range(2)]
    inter = _milora_intermediates(layers)
    ac = AdapterConfig(method="milora", top_k=k)
    obj = Objective(z_loss_coef=0.3, importance_coef=0.2, switch_coef=0.1, milora_coef=0.05)
    loss, metrics = jax.jit(lambda b, i: total_loss(logits, b, i, ac, obj))({"input_ids": ids, "attention_mask": jnp.asarray(attn)}, inter)

    z = imp = sw = mil = 0.0
    for x in layers:
        x = x[:3].astype(np.float64)  # the three real prompts
        p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
        z += np.mean(np.log(np.exp(x).sum(-1)) ** 2)
        s = p.sum(0)
        imp += s.var() / s.mean() ** 2
        top = np.argsort(-p, -1)[:, :k]
        f = np.bincount(top.ravel(), minlength=M) / top.size
        sw += M * np.sum(f * p.mean(0))
        fa = np.bincount(p.argmax(-1), minlength=M) / len(p)
        mil += M * np.sum(fa * p.mean(0))
    assert float(metrics["z_loss"]) == pytest.approx(z, rel=1e-5)
    assert float(metrics["importance_cv2"]) == pytest.approx(imp, rel=1e-5)
    assert float(metrics["switch_aux"]) == pytest.approx(sw, rel=1e-5)
    assert float(metrics["milora_balance"]) == pytest.approx(mil, rel=1e-5)
    ce = float(cross_entropy(logits, ids, jnp.asarray(attn))[0])
    assert float(loss) == pytest.approx(ce + 0.3 * z + 0.2 * imp + 0.1 * sw + 0.05 * mil, rel=1e-6)
    # milora_coef's default (the paper's 1e-2) still applies alone; without a mask every row counts
    stats = router_stats(inter, "milora")
    _, m = jax.jit(lambda b, i: total_loss(logits, b, i, AdapterConfig(method="milora", top_k=k)))({"input_ids": ids}, inter)
    assert set(m) & {"z_loss", "importance_cv2", "switch_aux"} == set()
    assert float(m["milora_balance"]) == pytest.approx(float(milora_prompt_balance(stats)[0]), rel=1e-6)


def test_a_coefficient_that_cannot_apply_is_a_one_line_error():
    for name, methods in COEF_METHODS.items():
        for method in METHODS:
            if method in methods:
                assert getattr(resolve_objective({name: 0.5}, method), name) == 0.5
                continue
            with pytest.raises(MoeLoraError) as err:
                resolve_objective({name: 0.5}, method)
            msg = str(err.value)
            assert "\n" not in msg and f"objective.{name}=0.5" in msg and f"method {method}" in msg, msg
            assert getattr(resolve_objective({name: 0.0}, method), name) == 0.0  # an explicit 0 is fine
    # the defaults raise nothing for any method and resolve per method (the papers' values)
    for method in METHODS:
        obj = resolve_objective(None, method)
        assert obj.loramoe_coef == (0.1 if method == "loramoe" else 0.0)
        assert obj.milora_coef == (1e-2 if method == "milora" else 0.0)
        assert obj.switch_coef == (1e-3 if method in ("mola", "mixlora") else 0.0)
        assert obj.switch_form == ("mixtral" if method == "mixlora" else "mola")
        ac = AdapterConfig(method=method)
        assert AdapterConfig.from_dict(json.loads(json.dumps(ac.to_dict()))) == ac
    # an adapter saved when the weights were adapter fields (loramoe_coef=0.1, milora_coef=0.01 for every
    # method, before the applicability check) still loads; its weights read back as the objective it trained with
    old = {**AdapterConfig(method="mola").to_dict(), "switch_coef": 2e-3, "switch_form": None, "importance_coef": 0.0,
           "z_loss_coef": 0.0, "loramoe_coef": 0.1, "milora_coef": 0.01, "loramoe_delta": 0.1,
           "contrastive_coef": 0.0, "contrastive_temperature": 0.07, "loramoe_form": "code"}
    assert AdapterConfig.from_dict(old) == AdapterConfig(method="mola")
    legacy = resolve_objective(legacy_objective(old), "mola")
    assert (legacy.switch_coef, legacy.loramoe_coef, legacy.milora_coef, legacy.switch_form) == (2e-3, 0.0, 0.0, "mola")
    with pytest.raises(MoeLoraError, match="milora_activation='tanh'"):
        AdapterConfig(method="milora", milora_activation="tanh")


# ----------------------------------------------------------------------------- router activation ablations
def test_router_activations_have_the_expected_values_and_the_per_depth_choice_applies_per_layer():
    import flax.linen as nn

    x = jnp.linspace(-3.0, 3.0, 13)

    class Probe(nn.Module):
        activation: str

        @nn.compact
        def __call__(self, x):
            return router_activation(self, self.activation)(x)

    values = {}
    for act in ("rational", "gelu", "relu"):
        variables = jax.jit(Probe(act).init)(jax.random.key(0), x)
        values[act] = np.asarray(jax.jit(Probe(act).apply)(variables, x))
        assert bool(variables) == (act == "rational")  # fixed activations have no weights
    np.testing.assert_allclose(values["relu"], np.maximum(np.asarray(x), 0.0), rtol=0, atol=0)
    from scipy.special import erf

    xs = np.asarray(x, np.float64)
    np.testing.assert_allclose(values["gelu"], 0.5 * xs * (1 + erf(xs / np.sqrt(2))), atol=1e-6)
    want = np.asarray(rational(x, jnp.asarray(RATIONAL_GELU_NUM), jnp.asarray(RATIONAL_GELU_DEN)))
    np.testing.assert_allclose(values["rational"], want, rtol=1e-6, atol=1e-7)
    assert np.abs(values["rational"] - values["gelu"]).max() < 2e-3 and np.abs(values["rational"] - values["gelu"]).max() > 0

    # MiLoRA-4 of the paper: ReLU in the first half of the layers, GELU in the second
    config, params = tiny_base()
    ac = AdapterConfig(method="milora", rank=2, top_k=2, milora_router_dim=8, milora_activation="relu",
                       milora_activation_deep="gelu")
    assert [ac.milora_activation_at(i, 4) for i in range(4)] == ["relu", "relu", "gelu", "gelu"]
    assert [ac.milora_activation_at(i, 5) for i in range(5)] == ["relu", "relu", "gelu", "gelu", "gelu"]
    assert AdapterConfig(method="milora").milora_activation_at(3, 4) == "rational"
    adapter = randomize(init_adapter(config, ac), scale=0.5)
    assert all("rational_num" not in adapter[f"layers_{i}"]["milora_router"] for i in range(2))
    ids = np.random.default_rng(0).integers(3, config.vocab_size, size=(2, 6)).astype(np.int32)
    _, inter = jax.jit(lambda v, i: LlamaForCausalLM(config, ac).apply(
        v, i, mutable=["intermediates"], capture_intermediates=lambda mdl, _: mdl.name == "input_layernorm"))(
        {"params": params, "adapter": adapter}, ids)
    inter = inter["intermediates"]
    # recompute each layer's router logits from its pooled input with either activation: only the configured one fits
    fns = {"relu": lambda v: np.maximum(v, 0), "gelu": lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2)))}
    for i, act in enumerate(["relu", "gelu"]):
        r = {k: np.asarray(v, np.float64) for k, v in adapter[f"layers_{i}"]["milora_router"].items()}
        h = inter[f"layers_{i}"]["input_layernorm"]["__call__"][0]
        pooled = np.asarray(pool(h, jnp.ones(ids.shape, bool), ac.milora_pooling, jnp.asarray(r["pool_query"], jnp.float32)))
        pre = pooled.astype(np.float64) @ r["w1"] + r["b1"]
        logits = np.asarray(inter[f"layers_{i}"]["milora_router"]["milora_logits"][0])
        for name, fn in fns.items():
            diff = np.abs(fn(pre) @ r["w2"] - logits).max()
            assert (diff < 1e-4) == (name == act), (i, act, name, diff)
