"""The two workflow formats: UI (what example_workflows ship and the editor saves) and API (what
the executor runs). ``ui_to_api`` maps widget values with ComfyUI's real INPUT_TYPES, as the
frontend does, so a shipped file that drifts from the node definitions fails the tests. An optional widget a file
saved before it existed has no value for takes its default, as in the editor."""
from __future__ import annotations

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES or kind == "COMBO"


def _has_control(name, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def ui_to_api(ui: dict, node_classes: dict) -> dict:
    links = {link[0]: link for link in ui.get("links", [])}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        if node["type"] not in node_classes:
            raise KeyError(f"workflow uses unknown node type {node['type']!r}")
        spec = node_classes[node["type"]].INPUT_TYPES()
        ordered = list(spec.get("required", {}).items()) + list(spec.get("optional", {}).items())
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        optional = spec.get("optional", {})
        for name, s in ordered:
            if _is_widget(s):
                if not values and name in optional and len(s) > 1 and "default" in s[1]:
                    inputs[name] = s[1]["default"]
                    continue
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
                inputs[name] = values.pop(0)
                if _has_control(name, s):
                    values.pop(0)
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api
