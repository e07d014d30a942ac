// TrainFree frontend extension (served through WEB_DIRECTORY = "./web").
//
// The calibration nodes write files (models/trainfree/<method>/<name>.safetensors) that the
// loader nodes offer in a dropdown. ComfyUI fills dropdowns when the page loads, so a file
// written by a run would only appear after the user pressed "Refresh" (R). A calibration node
// announces each file it writes (server event "trainfree.calibration_written", sent to every
// open editor: nodes/ui_support.py); on it, refresh the dropdowns as the Refresh button does.
// The server names the event, so this works for nodes inside subgraphs, for runs queued by
// another tab or over the API, and whatever happens later in the run (Cancel, an error).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const EVENT = "trainfree.calibration_written";

export function install(appRef, apiRef) {
  apiRef.addEventListener(EVENT, () => {
    Promise.resolve(appRef.refreshComboInNodes()).catch((e) => console.warn("trainfree: refresh failed", e));
  });
}

app.registerExtension({
  name: "trainfree.refreshCalibrationFiles",
  setup() {
    install(app, api);
  },
});
