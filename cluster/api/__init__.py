"""The public API's generated Python stubs (pdcluster/v1, from proto/), and their generator.

Regenerate after editing proto/: ``python -m cluster.api.generate``.
"""
