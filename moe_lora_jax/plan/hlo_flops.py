"""Matmul FLOPs of a compiled program, read from its optimized HLO text, loops counted by their trip counts.

XLA's `cost_analysis()` counts a while loop's body once, so a step whose layers run as one
`lax.scan` looks ~num_layers times cheaper than it is. This walks the per-device program instead:
every `dot` and `convolution` is 2 x (output elements) x (contracted size); a fusion or call counts
what it calls; a while loop counts its body times its trip count (the `known_trip_count` the compiler
records, else the bound in its condition); a conditional counts its most expensive branch (the
train step's non-finite guard: the update or the skip). Elementwise work is not counted.

    per_chip = hlo_matmul_flops(compiled.as_text())
"""

from __future__ import annotations

import math
import re
from typing import Iterator

_SHAPE = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:calls|to_apply|body)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+)|false_computation=%?([\w.\-]+))")


def _split_instruction(line: str) -> tuple[str, str, str, str, str] | None:
    """(name, type, opcode, operands, attributes) of one HLO instruction line, or None."""
    text = line.strip()
    if text.startswith("ROOT "):
        text = text[5:]
    if " = " not in text:
        return None
    name, rest = text.split(" = ", 1)
    if rest.startswith("("):  # tuple type: up to the matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        type_, rest = rest[: i + 1], rest[i + 1:].lstrip()
    else:
        type_, _, rest = rest.partition(" ")
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    depth, start = 0, m.end() - 1
    for j in range(start, len(rest)):
        depth += rest[j] == "("
        depth -= rest[j] == ")"
        if depth == 0:
            break
    return name.lstrip("%"), type_, m.group(1), rest[start + 1: j], rest[j + 1:]


def _dims(type_: str) -> list[int] | None:
    m = _SHAPE.match(type_)
    if not m:
        return None
    return [int(d) for d in m.group(1).split(",") if d]


def _computations(hlo: str) -> Iterator[tuple[str, list[str]]]:
    name, body = None, []
    for line in hlo.splitlines():
        if name is None:
            m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
            if m and not line.startswith(" "):
                name, body = m.group(1), []
        elif line.startswith("}"):
            yield name, body
            name = None
        else:
            body.append(line)


def _matmul_flops(opcode: str, out: list[int], operands: list[str], attrs: str, shapes: dict[str, list[int]]) -> float:
    lhs = shapes.get(operands[0].strip().lstrip("%")) if operands else None
    if lhs is None:
        return 0.0
    if opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
        contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m else 1
        return 2.0 * math.prod(out) * contracted
    labels = re.search(r"dim_labels=([^_\s,]+)_([^-\s,]+)->([^\s,]+)", attrs)
    if not labels or "f" not in labels.group(1):
        return 0.0
    lhs_labels, out_labels = labels.group(1), labels.group(3)
    features = lhs[lhs_labels.index("f")]
    groups = re.search(r"feature_group_count=(\d+)", attrs)
    spatial = sorted(c for c in lhs_labels if c.isdigit())
    window = _window(attrs, len(spatial))
    # Multiply-adds that touch data: per spatial dim, the (output position, window tap) pairs whose input
    # index is neither padding nor a dilation hole. XLA on TPU writes a batched or reshaped matmul as a
    # convolution whose window spans padding (window 4x2, pad 3_3x1_1 over size-1 dims): only one tap per
    # output is real, and counting the whole window overstated such a matmul 8x.
    labelled = len(out) == len(out_labels)
    out_spatial = [out[out_labels.index(c)] if labelled and c in out_labels else 1 for c in spatial]
    taps = math.prod(_valid_taps(lhs[lhs_labels.index(c)], n_out, **{k: v[i] for k, v in window.items()})
                     for i, (c, n_out) in enumerate(zip(spatial, out_spatial)))
    per_position = math.prod(out) / max(1, math.prod(out_spatial))
    return 2.0 * per_position * features / (int(groups.group(1)) if groups else 1) * taps


def _window(attrs: str, ndims: int) -> dict[str, list[int]]:
    """A convolution's window attributes, one value per spatial dim: size, pad_lo, stride, lhs_dilate,
    rhs_dilate (XLA's defaults where absent; the high padding only sets the output size, which is known)."""
    body = re.search(r"window=\{([^}]*)\}", attrs)
    text = body.group(1) if body else ""

    def field(name: str, default: int) -> list[int]:
        m = re.search(rf"\b{name}=([\dx]+)", text)
        return [int(v) for v in m.group(1).split("x")] if m else [default] * ndims

    pads = re.search(r"\bpad=([\d_x-]+)", text)
    pad_lo = [int(p.split("_")[0]) for p in pads.group(1).split("x")] if pads else [0] * ndims
    return {"size": field("size", 1), "pad_lo": pad_lo, "stride": field("stride", 1),
            "lhs_dilate": field("lhs_dilate", 1), "rhs_dilate": field("rhs_dilate", 1)}


def _valid_taps(n_in: int, n_out: int, size: int, pad_lo: int, stride: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dim that read real input: not padding, not a hole
    of the input's dilation."""
    span = (n_in - 1) * lhs_dilate + 1  # the dilated input
    if n_out * size > 4_000_000:  # not a matmul in disguise: every tap counts (an upper bound)
        return n_out * size
    count = 0
    for o in range(n_out):
        for k in range(size):
            p = o * stride + k * rhs_dilate - pad_lo
            count += 0 <= p < span and p % lhs_dilate == 0
    return count


_INT = ("s8", "s16", "s32", "s64", "u8", "u16", "u32", "u64")


def _int_constant(ins: tuple[str, str, str, str, str] | None) -> int | None:
    if ins is None or ins[2] != "constant" or not ins[1].startswith(_INT) or not re.fullmatch(r"-?\d+", ins[3].strip()):
        return None
    return int(ins[3].strip())


def _trip_count(comps: dict[str, list], caller: list, operand: str, attrs: str) -> int:
    """Iterations of a while loop: the compiler's `known_trip_count`, else read off its induction variable
    (condition `i < C`, body `i + S`, initial value from the loop's operand tuple, 0 if not a constant),
    else the largest integer constant in the condition.

    The induction step matters: XLA's windowed (collective) matmul loops on TPU step by 2 with a bound of
    twice their trip count; the largest constant counted those loops twice."""
    known = re.search(r"known_trip_count[^0-9]*(\d+)", attrs)
    if known:
        return int(known.group(1))
    cond_m, body_m = re.search(r"condition=%?([\w.\-]+)", attrs), re.search(r"body=%?([\w.\-]+)", attrs)
    cond = comps.get(cond_m.group(1), []) if cond_m else []
    fallback = max((c for c in map(_int_constant, cond) if c is not None), default=1)
    named = {i[0]: i for i in cond}
    compares = [i for i in cond if i[2] == "compare"]
    if len(compares) != 1 or not body_m:
        return fallback
    _, _, _, operands, cmp_attrs = compares[0]
    names = [o.strip().lstrip("%") for o in operands.split(",")]
    direction = re.search(r"direction=(\w+)", cmp_attrs)
    if len(names) != 2 or not direction or direction.group(1) not in ("LT", "LE"):
        return fallback
    lhs, rhs = named.get(names[0]), named.get(names[1])
    bound = _int_constant(rhs)
    index = re.search(r"index=(\d+)", lhs[4]) if lhs is not None and lhs[2] == "get-tuple-element" else None
    if bound is None or index is None:
        return fallback
    k = int(index.group(1))
    body = comps.get(body_m.group(1), [])
    body_named = {i[0]: i for i in body}
    roots = [i for i in body if i[2] == "tuple"]
    step = None
    if roots:
        elems = [o.strip().lstrip("%") for o in roots[-1][3].split(",")]
        update = body_named.get(elems[k]) if k < len(elems) else None
        if update is not None and update[2] == "add":
            parts = [body_named.get(o.strip().lstrip("%")) for o in update[3].split(",")]
            consts = [c for c in map(_int_constant, parts) if c is not None]
            gtes = [q for q in parts if q is not None and q[2] == "get-tuple-element" and re.search(rf"index={k}\b", q[4])]
            if len(consts) == 1 and gtes:
                step = consts[0]
    if not step or step <= 0:
        return fallback
    caller_named = {i[0]: i for i in caller}
    init = 0
    tup = caller_named.get(operand.strip().split(",")[0].strip().lstrip("%"))
    if tup is not None and tup[2] == "tuple":
        elems = [o.strip().lstrip("%") for o in tup[3].split(",")]
        start = caller_named.get(elems[k]) if k < len(elems) else None
        while start is not None and start[2] in ("copy", "bitcast"):
            start = caller_named.get(start[3].strip().lstrip("%"))
        init = _int_constant(start) or 0
    span = bound - init + (1 if direction.group(1) == "LE" else 0)
    return max(0, -(-span // step))


def hlo_matmul_flops(hlo: str) -> float:
    """Matmul FLOPs of the entry computation of an HLO module's text, with loops unrolled by their trip counts."""
    comps: dict[str, list[tuple[str, str, str, str, str]]] = {}
    entry = None
    for name, lines in _computations(hlo):
        comps[name] = [p for p in (_split_instruction(l) for l in lines) if p is not None]
    for line in hlo.splitlines():
        if line.startswith("ENTRY"):
            entry = re.match(r"^ENTRY\s+%?([\w.\-]+)", line).group(1)
    memo: dict[str, float] = {}

    def flops(comp: str) -> float:
        if comp in memo:
            return memo[comp]
        memo[comp] = 0.0  # guards against recursion
        shapes = {n: d for n, t, *_ in comps.get(comp, []) if (d := _dims(t)) is not None}
        total = 0.0
        for name, type_, opcode, args, attrs in comps.get(comp, []):
            if opcode in ("dot", "convolution"):
                total += _matmul_flops(opcode, shapes.get(name, []), args.split(","), attrs, shapes)
            elif opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", attrs)
                total += _trip_count(comps, comps.get(comp, []), args, attrs) * (flops(body.group(1)) if body else 0.0)
            elif opcode == "conditional":
                branches = []
                for m in _BRANCHES.finditer(attrs):
                    names = m.group(1).split(",") if m.group(1) else [m.group(2) or m.group(3)]
                    branches += [flops(b.strip().lstrip("%")) for b in names if b.strip()]
                total += max(branches, default=0.0)
            else:
                total += sum(flops(c) for c in _CALLS.findall(attrs))
        memo[comp] = total
        return total

    return flops(entry) if entry else 0.0


def hlo_matmul_breakdown(hlo: str, top: int = 8) -> list[dict[str, float | str]]:
    """The `top` largest groups of matmuls by FLOPs per chip, grouped by the JAX operation that made them
    (the HLO's op_name, layer indices dropped): where a compiled count above the analytic one comes from.
    Loop bodies count once per iteration; both branches of a conditional are counted."""
    comps = {name: [p for p in (_split_instruction(l) for l in lines) if p is not None] for name, lines in _computations(hlo)}
    entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo, re.M)
    mult: dict[str, float] = {}

    def walk(comp: str, m: float, depth: int = 0) -> None:
        mult[comp] = mult.get(comp, 0.0) + m
        if depth > 64:
            return
        for _, _, opcode, args, attrs in comps.get(comp, []):
            if opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", attrs)
                trips = _trip_count(comps, comps.get(comp, []), args, attrs)
                if body:
                    walk(body.group(1), m * trips, depth + 1)
                continue
            called = _CALLS.findall(attrs)
            for b in _BRANCHES.finditer(attrs):
                called += [x.strip().lstrip("%") for x in (b.group(1).split(",") if b.group(1) else [b.group(2) or b.group(3)])]
            for c in called:
                walk(c, m, depth + 1)

    if not entry:
        return []
    walk(entry.group(1), 1.0)
    groups: dict[str, float] = {}
    for comp, instructions in comps.items():
        if comp not in mult:
            continue
        shapes = {n: d for n, t, *_ in instructions if (d := _dims(t)) is not None}
        for name, _, opcode, args, attrs in instructions:
            if opcode not in ("dot", "convolution"):
                continue
            op = re.search(r'op_name="([^"]*)"', attrs)
            key = op.group(1) if op else "?"
            key = re.sub(r"^jit\([^)]*\)/", "", key)
            key = re.sub(r"(layers_|DecoderLayer_)\d+", r"\1*", key).replace("/while/body/closed_call", "/scan")
            groups[key] = groups.get(key, 0.0) + mult[comp] * _matmul_flops(opcode, shapes.get(name, []), args.split(","), attrs, shapes)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    return [{"op": k, "flops_per_chip": v} for k, v in ranked]
