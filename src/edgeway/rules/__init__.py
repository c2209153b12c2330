"""Local decisions: rules over readings, with durable state and actions.

The rule models (``edgeway.rules.config``) import only the shared value types
(``edgeway.config_types``) and the route match, so the root schema imports them
like any component's section model, without a cycle.
"""
