"""Placement planner: latency models of one step, a discrete-event simulator of the engine's own
scheduling, and the goodput-optimal placement search (DistServe, Section 4)."""
