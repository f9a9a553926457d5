rep("gate_up lb(128,12) route=1", timeit(lambda i: gate_up(i, route=1, name="moe_gate_up_64_lb")), gu_mb)
rep("down lb(224,6)", timeit(lambda i: down(i, name="moe_down_4_lb")), dn_mb)
print("regs", {n: mod.get_function(n).num_regs for n in ("moe_gate_up_64", "moe_gate_up_64_lb", "moe_down_4", "moe_down_4_lb", "moe_router_warp")})
