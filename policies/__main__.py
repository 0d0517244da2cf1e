"""``python -m moecache.policies`` (or ``moecache policies``): the policy table of the README."""

from . import policy_table

print(policy_table())
