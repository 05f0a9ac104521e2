"""The clinic service's HTTP API, one router per area.

- `deps`: who is calling (`Principal`, from the API key) and the service's parts, taken from
  `request.app.state` (set by `diagnostics.serve.app.create_app`);
- `errors`: problem+json for every error, and the handlers that answer with it;
- `studies` (clinics: upload, results, heatmaps), `reviews` (reviewers: worklist, reviews,
  reports, statistics), `health` (liveness, readiness, Prometheus metrics), `admin`.
"""
