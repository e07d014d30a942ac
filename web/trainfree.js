// TrainFree frontend extension (served through WEB_DIRECTORY = "./web").
//
// The calibration nodes write files (models/trainfree/<method>/<name>.safetensors) that the
// loader nodes offer in a dropdown. ComfyUI fills dropdowns when the page loads, so a file
// written by a run would only appear after the user pressed "Refresh" (R). After a run in
// which one of these nodes actually executed (not served from cache) and finished, refresh the
// dropdowns once, as the Refresh button does: also when a later node of the run was cancelled
// or failed, since the file is written by then.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const WRITERS = new Set([
  "TrainFreeDPMSolverV3Calibrate",
  "TrainFreeDCSolverSearch",
  "TrainFreeLinearAGCalibrate",
  "TrainFreeCacheQuantCalibrate",
]);

export function nodeType(graph, id) {
  if (id === null || id === undefined || !graph?.getNodeById) return null;
  const node = graph.getNodeById(id) ?? graph.getNodeById(Number(id));
  return node?.comfyClass ?? node?.type ?? null;
}

export function install(appRef, apiRef) {
  let started = [];   // writer nodes that started executing in this run (not served from cache)
  apiRef.addEventListener("execution_start", () => { started = []; });
  apiRef.addEventListener("executing", ({ detail }) => {
    if (WRITERS.has(nodeType(appRef.graph, detail))) started.push(String(detail));
  });
  apiRef.addEventListener("execution_success", () => {
    const wrote = started.length > 0;
    started = [];
    if (wrote) appRef.refreshComboInNodes();
  });
  // A run cancelled or failed after a writer finished (ComfyUI lists the finished nodes in `executed`) still
  // wrote that writer's file; a writer stopped itself wrote nothing.
  const stopped = ({ detail }) => {
    const finished = new Set((detail?.executed ?? []).map(String));
    const wrote = started.some((id) => finished.has(id));
    started = [];
    if (wrote) appRef.refreshComboInNodes();
  };
  apiRef.addEventListener("execution_interrupted", stopped);
  apiRef.addEventListener("execution_error", stopped);
}

app.registerExtension({
  name: "trainfree.refreshCalibrationFiles",
  setup() {
    install(app, api);
  },
});
