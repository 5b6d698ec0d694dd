"""The `cli/` package: no import cycle, one module per subcommand, `python -m moe_lora_jax.cli`;
the one model+adapter loader; one allocation recipe dispatch for the train config and `moe-lora allocate`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from subprocess_testlib import REPO, clean_env

PACKAGE = REPO / "moe_lora_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The package's own modules that `path` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_lora_jax"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("moe_lora_jax"))
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(p, top_level_only) if m in modules and m != name} for name, p in modules.items()}


def _cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """A cycle among `nodes` (depth-first search), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n] & nodes):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(nodes):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cli_modules_form_a_tree_without_cycles():
    graph = _graph(top_level_only=False)  # function-local imports count too: they were the old cycle
    cli = {n for n in graph if n.startswith("moe_lora_jax.cli.") and n != "moe_lora_jax.cli.__main__"}
    assert {"moe_lora_jax.cli.common", "moe_lora_jax.cli.info", "moe_lora_jax.cli.convert", "moe_lora_jax.cli.train",
            "moe_lora_jax.cli.generate", "moe_lora_jax.cli.eval", "moe_lora_jax.cli.allocate"} <= cli
    for name in sorted(cli):
        own = {m for m in graph[name] if m == "moe_lora_jax.cli" or m.startswith("moe_lora_jax.cli.")}
        assert own <= {"moe_lora_jax.cli.common"}, f"{name} imports {sorted(own)}: subcommands import only cli.common"
    assert _cycle(graph, cli | {"moe_lora_jax.cli"}) is None
    # nothing in the library imports the command line
    lib = [n for n in graph if not n.startswith("moe_lora_jax.cli")]
    assert not [n for n in lib if any(m.startswith("moe_lora_jax.cli") for m in graph[n])]


def test_package_module_level_imports_have_no_cycle():
    graph = _graph(top_level_only=True)
    # a package's __init__ importing its own submodules is not a cycle worth reporting: drop those edges
    pruned = {n: {m for m in ms if not (n.endswith(m.rsplit(".", 1)[0]) and m.startswith(n + "."))} for n, ms in graph.items()}
    assert _cycle(pruned, set(pruned)) is None


def test_old_module_paths_are_gone_and_new_ones_import():
    for old in ("cli.py", "cli_train.py", "cli_generate.py", "cli_eval.py", "cli_allocation.py", "generate.py", "evaluate.py"):
        assert not (PACKAGE / old).exists(), old
    from moe_lora_jax.infer.evaluate import exact_match_eval
    from moe_lora_jax.infer.generate import beam_search

    assert callable(exact_match_eval) and callable(beam_search)


def test_python_dash_m_runs_the_command_and_loads_no_heavy_optional_module():
    code = ("import sys, runpy; sys.argv = ['moe-lora', '--help']\n"
            "try:\n    runpy.run_module('moe_lora_jax.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'matplotlib'))\n"
            "import jax._src.xla_bridge as xb\n"
            "print('HEAVY', heavy, 'BACKENDS', bool(xb._backends))\n")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for sub in ("info", "convert", "generate", "eval", "train", "quickstart", "analyze", "allocate"):
        assert sub in out.stdout
    # start-up stays light, and no JAX backend starts before `train` calls jax.distributed.initialize
    assert "HEAVY [] BACKENDS False" in out.stdout


# ----------------------------------------------------------------------------- the loader
def test_load_model_and_adapter_checks_the_adapter_before_the_weights(tmp_path, monkeypatch):
    import jax

    from conftest import TINY, init_adapter, randomize, tiny_base
    from moe_lora_jax.adapters import AdapterConfig, save_adapter
    from moe_lora_jax.convert import load_model_and_adapter, loader, save_hf_llama
    from moe_lora_jax.errors import MoeLoraError

    config, params = tiny_base(TINY, seed=2)
    hf_dir = save_hf_llama(config, params, tmp_path / "hf")  # no torch needed
    lora = AdapterConfig(method="lora", rank=2, alpha=4.0, target_modules=("q", "v"))
    mola = AdapterConfig(method="mola", rank=2, num_experts=2, top_k=1, target_modules=("q",))
    save_adapter(tmp_path / "lora", randomize(init_adapter(config, lora), seed=3, scale=0.2), lora, config)
    save_adapter(tmp_path / "mola", randomize(init_adapter(config, mola), seed=3, scale=0.2), mola, config)
    other = TINY.replace(hidden_size=TINY.hidden_size * 2, head_dim=TINY.head_dim * 2)
    save_adapter(tmp_path / "other", init_adapter(other, lora), lora, other)

    path, cfg, model, variables = load_model_and_adapter(str(hf_dir), tmp_path / "lora", progress=False)
    assert set(variables) == {"params", "adapter"} and model.adapter_config.method == "lora"
    _, _, plain, merged = load_model_and_adapter(str(hf_dir), tmp_path / "lora", merge=True, progress=False)
    assert set(merged) == {"params"} and plain.adapter_config is None
    ids = jax.numpy.asarray([[1, 5, 9, 3]])
    np.testing.assert_allclose(np.asarray(plain.apply(merged, ids)), np.asarray(model.apply(variables, ids)), atol=2e-5)
    _, _, base_model, base = load_model_and_adapter(str(hf_dir), progress=False)
    assert set(base) == {"params"}
    assert np.abs(np.asarray(base_model.apply(base, ids)) - np.asarray(model.apply(variables, ids))).max() > 1e-4

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the adapter was checked")

    monkeypatch.setattr(loader, "load_llama", no_weights)
    with pytest.raises(MoeLoraError, match="shape"):
        load_model_and_adapter(str(hf_dir), tmp_path / "other", progress=False)
    with pytest.raises(MoeLoraError, match="only plain LoRA can be merged"):
        load_model_and_adapter(str(hf_dir), tmp_path / "mola", merge=True, progress=False)


# ----------------------------------------------------------------------------- allocation recipes
def test_one_recipe_dispatch_for_train_config_and_allocate():
    from moe_lora_jax.allocation import HillOptions, analyze_params
    from moe_lora_jax.allocation.recipes import allocate_recipe, resolve_allocation
    from moe_lora_jax.errors import MoeLoraError
    from moe_lora_jax.train import loop

    assert loop.resolve_allocation is resolve_allocation  # the train loop has no dispatch of its own
    shape = resolve_allocation({"method": "mola-8642", "total": 20}, None, 4)
    assert shape == allocate_recipe("mola-8642", 4, 20)
    assert shape.experts_per_layer == [8, 6, 4, 2]  # MoLA's triangle, one layer per quarter

    from conftest import TINY, tiny_base

    _, params = tiny_base(TINY.replace(num_hidden_layers=4), seed=1)
    via_config = resolve_allocation({"method": "alphalora", "total": 12, "top_k": 2}, params, 4)
    fits = analyze_params(params, HillOptions("fix-finger"))
    via_cli = allocate_recipe("alphalora", 4, 12, fits=fits, top_k=2)
    assert via_config == via_cli and sum(via_cli.experts_per_layer) == 12
    assert via_cli.provenance["estimator"] == "fix-finger"
    with pytest.raises(MoeLoraError, match="^adapter.allocation.method 'mola-triangle' is an old"):
        resolve_allocation({"method": "mola-triangle", "total": 20}, None, 4)
    with pytest.raises(MoeLoraError, match="weights"):
        allocate_recipe("alphalora", 4, 12)


def test_the_packages_warnings_print_as_plain_lines_whatever_the_root_logger_does(capsys):
    import logging

    from moe_lora_jax.cli.common import configure_logging

    root = logging.getLogger()
    basic = logging.StreamHandler(sys.stderr)  # what a library's module-level logging.warning installs
    basic.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    root.addHandler(basic)
    try:
        configure_logging()
        configure_logging()  # every `main` call configures: still one handler
        logging.getLogger("moe_lora_jax.data.pipeline").warning("train: 3/4 examples kept")
    finally:
        root.removeHandler(basic)
    assert capsys.readouterr().err == "train: 3/4 examples kept\n"
