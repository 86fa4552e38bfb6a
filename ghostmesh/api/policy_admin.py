"""The policy half of the Admin servicer: GetPolicy / SetPolicy / CheckPolicy / TestPolicy.

A mixin of :class:`ghostmesh.api.admin.AdminServicer` (it reuses that class's caller check and audit
hook) so the policy RPCs live apart from users/nodes/keys. SetPolicy refuses a policy that does not parse
(INVALID_ARGUMENT) or whose ``[[tests]]`` fail (FAILED_PRECONDITION); the old policy then stays in force.
"""

from __future__ import annotations

from typing import Any

import grpc

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh.api.admin_base import AdminBase
from ghostmesh.api.errors import grpc_errors
from ghostmesh.mapper import ident_of
from ghostmesh.policy_source import PolicyInfo, PolicyManager

Ctx = grpc.aio.ServicerContext[Any, Any]
POLICY_SET = "policy.set"  # audit action


def policy_pb(info: PolicyInfo) -> apb.Policy:
    return apb.Policy(text=info.text, sha256=info.sha256, updated_unix=int(info.updated), source=info.source)


class PolicyAdminMixin(AdminBase):
    policy: PolicyManager

    @grpc_errors
    async def GetPolicy(self, request: apb.GetPolicyRequest, context: Ctx) -> apb.Policy:
        self._authorize(context)
        return policy_pb(self.policy.info)

    @grpc_errors
    async def SetPolicy(self, request: apb.SetPolicyRequest, context: Ctx) -> apb.Policy:
        actor = self._authorize(context)
        old = self.policy.info.sha256
        info = self.policy.set(request.text)
        self._audit(context, actor, POLICY_SET, info.source, {"sha256": info.sha256, "previous": old})
        return policy_pb(info)

    @grpc_errors
    async def CheckPolicy(self, request: apb.CheckPolicyRequest, context: Ctx) -> apb.CheckPolicyResponse:
        self._authorize(context)
        errors, passed = self.policy.check(request.text)
        return apb.CheckPolicyResponse(ok=not errors, errors=errors, tests_passed=passed)

    @grpc_errors
    async def TestPolicy(self, request: apb.TestPolicyRequest, context: Ctx) -> apb.TestPolicyResponse:
        self._authorize(context)
        queries = [(q.src, q.dst, q.protocol) for q in request.queries]
        state = self.hub.state
        nodes = (ident_of(n, state.groups_of(n.user)) for n in state.nodes())
        answers = self.policy.test(request.text, queries, nodes)
        return apb.TestPolicyResponse(
            answers=[
                apb.AccessAnswer(
                    query=apb.AccessQuery(src=a.src, dst=a.dst, protocol=a.proto),
                    allowed=a.allowed,
                    reason=a.reason,
                )
                for a in answers
            ]
        )
