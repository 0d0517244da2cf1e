"""``python -m moecache.policies``: print the README's policy table from the registry."""

from . import policy_table

print(policy_table())
