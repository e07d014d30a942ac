// Runs web/trainfree.js against stand-ins for ComfyUI's scripts/app.js and scripts/api.js and
// prints what it did as JSON (tests/test_web_extension.py asserts on it).
import { app, api } from "./scripts/app.js";

const mod = await import("./extensions/trainfree/trainfree.js");
const registered = app.extensions.map((e) => e.name);
for (const e of app.extensions) e.setup?.();

const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, { detail }));
const written = [mod.EVENT, { folder: "dpm_solver_v3", file: "my_model_v3.safetensors" }];
const runs = {
  // a run in which a calibration node (id 3) wrote its file
  calibration: [["execution_start", {}], ["executing", "1"], ["executing", "3"], written, ["executing", null],
                ["execution_success", {}]],
  // the calibration node was cached, or reused its file: nothing written, no refresh
  cached: [["execution_start", {}], ["execution_cached", { nodes: ["3"] }], ["executing", "1"],
           ["executing", null], ["execution_success", {}]],
  // the calibration itself failed or was cancelled: nothing written, no refresh
  failed: [["execution_start", {}], ["executing", "3"], ["execution_error", {}]],
  // the file was written, then sampling was cancelled or failed: refresh
  cancelled_after_write: [["execution_start", {}], ["executing", "3"], written, ["executing", "1"],
                          ["execution_interrupted", { node_id: "1", executed: ["3"] }], ["executing", null]],
  error_after_write: [["execution_start", {}], ["executing", "3"], written, ["executing", "1"],
                      ["execution_error", { node_id: "1", executed: ["2", "3"] }], ["executing", null]],
  // a calibration node inside a subgraph (execution id "7:3"): refresh
  subgraph: [["execution_start", {}], ["executing", "7:3"], written, ["executing", null], ["execution_success", {}]],
  // a run queued from another tab or over the API: only the server's event arrives
  other_client: [written],
  // two calibration nodes in one run: each file refreshes the lists
  two_files: [["execution_start", {}], written, written, ["execution_success", {}]],
  // ComfyUI's own messages alone never refresh
  plain: [["execution_start", {}], ["executing", "1"], ["executing", "99"], ["execution_success", {}]],
};
const refreshes = {};
for (const [name, events] of Object.entries(runs)) {
  app.refreshCount = 0;
  for (const [type, detail] of events) send(type, detail);
  refreshes[name] = app.refreshCount;
}
// a failing refresh (server unreachable) is logged, never thrown into the event loop
app.failNext = true;
send(...written);
await new Promise((r) => setTimeout(r, 10));
console.log(JSON.stringify({ registered, event: mod.EVENT, refreshes, failureLogged: app.failureLogged }));
