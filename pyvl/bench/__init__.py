"""Benchmarks behind ``pyvl bench``: each module measures one stage and returns rows for a table."""
