// Stand-in for ComfyUI's scripts/app.js and scripts/api.js (the frontend's shims re-export these).
export const api = new EventTarget();
const nodes = { 1: { comfyClass: "KSampler" }, 3: { comfyClass: "TrainFreeDPMSolverV3Calibrate" } };
export const app = {
  extensions: [],
  refreshCount: 0,
  graph: { getNodeById: (id) => nodes[id] ?? null },
  registerExtension(ext) { this.extensions.push(ext); },
  async refreshComboInNodes() { this.refreshCount += 1; },
};
