// Baseline (b): the least a Worker can do in front of the upstream — forward the request as it came, return the
// upstream's response as it comes (the body streams through untouched). The gating, parsing and relaying the
// gateway adds on top is what the gateway-vs-(b) figures measure.
export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    // /v1/chat/completions → <UPSTREAM_ORIGIN>/api/v1/chat/completions, as the gateway maps it.
    return fetch(`${env.UPSTREAM_ORIGIN}/api${url.pathname}${url.search}`, request);
  },
};
