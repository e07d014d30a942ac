// Runs web/trainfree.js against stand-ins for ComfyUI's scripts/app.js and scripts/api.js and
// prints what it did as JSON (tests/test_web_extension.py asserts on it).
import { app, api } from "./scripts/app.js";

const mod = await import("./extensions/trainfree/trainfree.js");
const registered = app.extensions.map((e) => e.name);
for (const e of app.extensions) e.setup?.();

const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, { detail }));
const runs = {
  // a run in which the DPM-Solver-v3 calibration node (id 3) executed
  calibration: [["execution_start", {}], ["executing", "1"], ["executing", "3"], ["executing", null],
                ["execution_success", {}]],
  // nothing that writes files executed (the calibration node was cached)
  cached: [["execution_start", {}], ["execution_cached", { nodes: ["3"] }], ["executing", "1"],
           ["executing", null], ["execution_success", {}]],
  // the calibration node started but the run failed: no refresh
  failed: [["execution_start", {}], ["executing", "3"], ["execution_error", {}]],
  // the calibration node finished (its file is written), then sampling was cancelled: refresh
  cancelled_after_write: [["execution_start", {}], ["executing", "3"], ["executing", "1"],
                          ["execution_interrupted", { node_id: "1", executed: ["3"] }], ["executing", null]],
  // ... or sampling failed (out of memory): refresh
  error_after_write: [["execution_start", {}], ["executing", "3"], ["executing", "1"],
                      ["execution_error", { node_id: "1", executed: ["2", "3"] }], ["executing", null]],
  // the calibration itself was cancelled (nothing written): no refresh
  cancelled_writer: [["execution_start", {}], ["executing", "3"],
                     ["execution_interrupted", { node_id: "3", executed: [] }], ["executing", null]],
  // the next run after a failure, without a writer: still no refresh
  after_failure: [["execution_start", {}], ["executing", "1"], ["execution_success", {}]],
  // a node in a subgraph (id "7:3") or an unknown id never breaks the listener
  subgraph: [["execution_start", {}], ["executing", "7:3"], ["executing", "99"], ["execution_success", {}]],
};
const refreshes = {};
for (const [name, events] of Object.entries(runs)) {
  app.refreshCount = 0;
  for (const [type, detail] of events) send(type, detail);
  refreshes[name] = app.refreshCount;
}
console.log(JSON.stringify({ registered, writers: [...mod.WRITERS].sort(), refreshes }));
