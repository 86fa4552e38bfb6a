"""The policy half of the Admin servicer: GetPolicy / SetPolicy / CheckPolicy / TestPolicy.

A mixin of :class:`ghostmesh.api.admin.AdminServicer` (it reuses that class's caller check and audit
hook) so the policy RPCs live apart from users/nodes/keys. Each RPC asks the policy's owner,
:class:`ghostmesh.policy_source.PolicySource`, and records what the caller changed. SetPolicy refuses a
policy that does not parse (INVALID_ARGUMENT) or whose ``[[tests]]`` fail (FAILED_PRECONDITION); the old
policy then stays in force.
"""

from __future__ import annotations

from typing import Any

import grpc

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh.api.admin_base import AdminBase, Caller
from ghostmesh.api.errors import grpc_errors
from ghostmesh.audit import POLICY_SET
from ghostmesh.policy_source import PolicyInfo, PolicySource

Ctx = grpc.aio.ServicerContext[Any, Any]


def policy_pb(info: PolicyInfo) -> apb.Policy:
    return apb.Policy(text=info.text, sha256=info.sha256, updated_unix=int(info.updated), source=info.source)


class PolicyAdminMixin(AdminBase):
    policy: PolicySource

    @grpc_errors
    async def GetPolicy(self, request: apb.GetPolicyRequest, context: Ctx) -> apb.Policy:
        self._authorize(context)
        return policy_pb(self.policy.info)

    @grpc_errors
    async def SetPolicy(self, request: apb.SetPolicyRequest, context: Ctx) -> apb.Policy:
        return self.set_policy(self._caller(context), request)

    def set_policy(self, caller: Caller, request: apb.SetPolicyRequest) -> apb.Policy:
        old = self.policy.info.sha256
        with self.hub.transaction() as tx:
            info = self.policy.set(request.text)
            detail = {"sha256": info.sha256, "previous": old}
            tx.record(caller.actor, POLICY_SET, info.source, detail, caller.remote)
        return policy_pb(info)

    @grpc_errors
    async def CheckPolicy(self, request: apb.CheckPolicyRequest, context: Ctx) -> apb.CheckPolicyResponse:
        self._authorize(context)
        return self.check_policy(request)

    def check_policy(self, request: apb.CheckPolicyRequest) -> apb.CheckPolicyResponse:
        errors, passed = self.policy.check(request.text)
        return apb.CheckPolicyResponse(ok=not errors, errors=errors, tests_passed=passed)

    @grpc_errors
    async def TestPolicy(self, request: apb.TestPolicyRequest, context: Ctx) -> apb.TestPolicyResponse:
        self._authorize(context)
        return self.test_policy(request)

    def test_policy(self, request: apb.TestPolicyRequest) -> apb.TestPolicyResponse:
        queries = [(q.src, q.dst, q.protocol) for q in request.queries]
        answers = self.policy.test(request.text, queries)
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
