"""Scripted load scenarios: a machine of VMs, a timeline of phases, results and plots."""
