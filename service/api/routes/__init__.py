"""The HTTP routes, one router per resource: health (probes, metrics), reads (recommend, score), writes (events,
items). Each route is an adapter: the request model in, `service.api.handlers` does the work, the response out."""
