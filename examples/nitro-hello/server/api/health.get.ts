// Polled by the deployer (and Fly's health checks) before traffic moves to a new release.
export default defineEventHandler(() => ({ status: "ok" }));
