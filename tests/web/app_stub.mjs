// Stand-in for ComfyUI's scripts/app.js and scripts/api.js (the frontend's shims re-export these).
export const api = new EventTarget();
export const app = {
  extensions: [],
  refreshCount: 0,
  failNext: false,
  failureLogged: false,
  registerExtension(ext) { this.extensions.push(ext); },
  async refreshComboInNodes() {
    if (this.failNext) {
      this.failNext = false;
      throw new Error("object_info unreachable");
    }
    this.refreshCount += 1;
  },
};
const warn = console.warn;
console.warn = (...a) => {
  if (String(a[0]).startsWith("trainfree: refresh failed")) app.failureLogged = true;
  else warn(...a);
};
