"""gRPC servicers of ghostmesh: Coordination (nodes) and Admin (ghostctl / API clients)."""
