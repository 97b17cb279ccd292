"""Development tools: fake-edrone (a local stand-in of edrone's trace API) and simulate
(signed webhooks like edrone's)."""
