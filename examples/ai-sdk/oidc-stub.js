// The AI SDK imports its Vercel gateway provider, which imports @vercel/oidc (CommonJS: a
// browser cannot load it as a module). This page never calls a model through the gateway —
// threadgate does the model work — so the two names it imports are stubs.
export function getContext() {
  return {};
}

export async function getVercelOidcToken() {
  throw new Error("no Vercel OIDC token in this example: models run behind threadgate");
}
