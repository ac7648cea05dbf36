export default defineEventHandler(() => "Hello from Nitro on Fly.io!");
