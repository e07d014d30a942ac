// TrainFree frontend extension (served through WEB_DIRECTORY = "./web").
//
// The calibration nodes write files (models/trainfree/<method>/<name>.safetensors) that the
// loader nodes offer in a dropdown. ComfyUI fills dropdowns when the page loads, so a file
// written by a run would only appear after the user pressed "Refresh" (R). After a run in
// which one of these nodes actually executed (not served from cache), refresh the dropdowns
// once, as the Refresh button does.
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
  let wrote = false;
  apiRef.addEventListener("execution_start", () => { wrote = false; });
  apiRef.addEventListener("executing", ({ detail }) => {
    if (WRITERS.has(nodeType(appRef.graph, detail))) wrote = true;
  });
  apiRef.addEventListener("execution_success", () => {
    if (!wrote) return;
    wrote = false;
    appRef.refreshComboInNodes();
  });
}

app.registerExtension({
  name: "trainfree.refreshCalibrationFiles",
  setup() {
    install(app, api);
  },
});
