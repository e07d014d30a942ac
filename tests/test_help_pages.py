"""Node help pages (web/docs/<NodeId>.md): the ComfyUI frontend's node documentation panel shows them instead of
the node's DESCRIPTION and input tooltips, so every node needs one and it must document every input.

The node modules import ComfyUI, so nothing in nodes/ is imported here: node ids, display names and input names
are read from the source with ``ast``.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "web" / "docs"
WORKFLOWS = ROOT / "example_workflows"
SECTIONS = ("## Inputs", "## Outputs", "## How to use")


def _module_defs(tree):
    """Module-level classes, functions and dict-literal assignments of one parsed module, by name."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    dicts = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
             for t in n.targets if isinstance(t, ast.Name)}
    return classes, functions, dicts


def _dict_keys(node: ast.Dict, dicts) -> set:
    """String keys of a dict literal; ``**NAME`` entries (e.g. cache_quant's SPAN_INPUTS) resolved to the module's
    dict literal of that name, or to one of another nodes/ module (calibration_support's STEP_RANGE_INPUTS)."""
    keys = set()
    for k, v in zip(node.keys, node.values):
        if k is None:                                     # **spread
            assert isinstance(v, ast.Name) and v.id in dicts, f"unresolved **{ast.unparse(v)} in an input dict"
            keys |= _dict_keys(dicts[v.id], dicts)
        elif isinstance(k, ast.Constant) and isinstance(k.value, str):
            keys.add(k.value)
    return keys


def _input_types(cls: ast.ClassDef, classes) -> ast.FunctionDef:
    """The INPUT_TYPES method of ``cls`` or of its nearest base class defined in the same module."""
    for item in cls.body:
        if isinstance(item, ast.FunctionDef) and item.name == "INPUT_TYPES":
            return item
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            return _input_types(classes[base.id], classes)
    raise AssertionError(f"{cls.name} has no INPUT_TYPES in its module")


def _input_names(function: ast.FunctionDef, functions, dicts, seen=()) -> set:
    """Keys of the dict literals under "required" / "optional" (not "hidden") in ``function``, following calls to
    module-level functions that build them (time_shift's ``_inputs``). Values built indirectly, such as the
    Adaptive Guidance Guider's ``"model": inputs["model"]``, still have literal keys, so they are found too."""
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value in ("required", "optional"):
                    assert isinstance(v, ast.Dict), f"{function.name}: {k.value!r} is not a dict literal"
                    names |= _dict_keys(v, dicts)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions \
                and node.func.id not in seen:
            names |= _input_names(functions[node.func.id], functions, dicts, (*seen, node.func.id))
    return names


def _nodes() -> dict:
    """{node id: (display name, {input names}, module file)} from the ``NODES = {...}`` literals of nodes/*.py."""
    nodes = {}
    paths = sorted((ROOT / "nodes").glob("*.py"))
    shared = {k: v for path in paths for k, v in _module_defs(ast.parse(path.read_text()))[2].items()}
    for path in paths:
        tree = ast.parse(path.read_text())
        classes, functions, own = _module_defs(tree)
        dicts = {**shared, **own}
        table = own.get("NODES")
        if table is None:
            continue
        for key, value in zip(table.keys, table.values):
            if key is None:                               # **OTHER_NODES: listed by the module that defines them
                continue
            cls_name, display = value.elts[0].id, value.elts[1].value
            names = _input_names(_input_types(classes[cls_name], classes), functions, dicts)
            nodes[key.value] = (display, names, path.name)
    return nodes


NODES = _nodes()


def _page(node_id: str) -> str:
    return (PAGES / f"{node_id}.md").read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(heading + "\n") + len(heading) + 1
    end = text.find("\n## ", start)
    return text[start:] if end < 0 else text[start:end]


def test_the_node_ids_and_inputs_are_read_from_the_source():
    """The ast reader finds all 25 nodes and the inputs built indirectly (a helper function, a **spread of a module
    dict, an input reused from another node's INPUT_TYPES), and leaves hidden inputs out."""
    assert len(NODES) == 25
    assert NODES["TrainFreeGHVBSampler"][0] == "GHVB Sampler (TrainFree)"
    assert NODES["TrainFreeTimeShiftDDIMSampler"][1] == {"window", "cutoff", "data_variance"}       # _inputs(...)
    assert NODES["TrainFreeDiTCache"][1] == {"model", "interval", "head_blocks", "tail_blocks", "schedule"}  # **SPAN
    assert {"head_blocks", "tail_blocks", "correction"} <= NODES["TrainFreeCacheQuantCalibrate"][1]
    assert NODES["TrainFreeAdaptiveGuidanceGuider"][1] == {"model", "positive", "negative", "cfg", "threshold"}
    assert "clean_latents" in NODES["TrainFreeDPMSolverV3Calibrate"][1]                             # optional
    assert all(names and "unique_id" not in names for _, names, _ in NODES.values())                # hidden


def test_every_node_has_exactly_one_page_and_no_page_is_for_an_unknown_node():
    assert PAGES.is_dir()
    missing = sorted(i for i in NODES if not (PAGES / f"{i}.md").is_file())
    assert missing == [], f"nodes without a help page: {missing}"
    unknown = sorted(p.name for p in PAGES.iterdir()
                     if not (p.is_file() and p.suffix == ".md" and p.stem in NODES)
                     and not (p.is_dir() and p.name in NODES))             # docs/<NodeId>/<locale>.md is allowed
    assert unknown == [], f"pages or files for no known node id: {unknown}"
    stems = [p.stem.lower() for p in PAGES.glob("*.md")]
    assert len(stems) == len(set(stems)), "two pages differ only in letter case"


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_page_structure(node_id):
    text = _page(node_id)
    display = NODES[node_id][0]
    assert text.splitlines()[0] == f"# {display}", "the page starts with '# <display name>'"
    positions = [text.find(f"\n{s}\n") for s in SECTIONS]
    assert all(p > 0 for p in positions), f"sections needed: {SECTIONS}"
    assert positions == sorted(positions), f"sections in this order: {SECTIONS}"
    assert "![" not in text, "no images"
    prose = re.sub(r"`[^`\n]*`", "", text)                  # placeholders such as <name> belong in code spans
    assert not re.search(r"<[A-Za-z/!]", prose), "no HTML (a bare <tag> would be swallowed by the renderer)"


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_every_input_is_documented(node_id):
    inputs = _section(_page(node_id), "## Inputs")
    undocumented = sorted(n for n in NODES[node_id][1] if f"**{n}**" not in inputs)
    assert undocumented == [], f"inputs of {node_id} missing from its '## Inputs' section: {undocumented}"


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_the_example_workflows_a_page_names_exist_and_use_the_node(node_id):
    named = set(re.findall(r"[\w.-]+\.json", _page(node_id)))
    absent = sorted(n for n in named if not (WORKFLOWS / n).is_file())
    assert absent == [], f"{node_id}: no such example workflow: {absent}"
    using = [n for n in named if f'"{node_id}"' in (WORKFLOWS / n).read_text()]
    assert using, f"{node_id}: the page names no example workflow in which the node appears"
