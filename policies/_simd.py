"""16-lane vector steps of the curve kernels (stack.py, opt_stack.py), as LLVM intrinsics.

numba does not vectorize these short, data-dependent steps on its own; written as one
vector compare (and, for the record shift, a log-step prefix maximum) they cost a few
instructions per block of 16 values on any target LLVM supports. Callers guarantee
that ``start + 16`` (``start + 64`` for window_mask64) lies within the array: the
kernels pad their arrays by whole blocks.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
_I32 = ir.IntType(32)
_VECTOR = ir.VectorType(_I32, LANES)
_LOWEST = ir.Constant(_VECTOR, [-(2**31)] * LANES)


def _block_pointer(context, builder, array_type, array, start, lanes=LANES):
    """Pointer to the ``lanes`` elements from ``start`` of a numba array, as one vector."""
    data = context.make_array(array_type)(context, builder, array).data
    vector = ir.VectorType(data.type.pointee, lanes)
    return builder.bitcast(builder.gep(data, [start]), vector.as_pointer())


def _splat(builder, value, lanes=LANES):
    """A vector of ``lanes`` copies of ``value``."""
    vector = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), zeros)


def _max(builder, a, b):
    return builder.select(builder.icmp_signed(">", a, b), a, b)


def _shift_up(builder, vector, lanes):
    """Lane i takes lane i - ``lanes``; the first lanes take the lowest int32."""
    order = [LANES + i if i < lanes else i - lanes for i in range(LANES)]
    return builder.shuffle_vector(vector, _LOWEST, ir.Constant(_VECTOR, order))


def _window(lanes):
    """Code for the mask of ``lanes`` int32 values from ``start`` with above < value <= limit."""
    def codegen(context, builder, signature, args):
        values_v, start_v, above_v, limit_v = args
        pointer = _block_pointer(context, builder, signature.args[0], values_v, start_v, lanes)
        block = builder.load(pointer, align=4)
        low = _splat(builder, builder.add(above_v, ir.Constant(_I32, 1)), lanes)
        span = _splat(builder, builder.sub(limit_v, above_v), lanes)
        inside = builder.icmp_unsigned("<", builder.sub(block, low), span)  # one unsigned compare
        mask = builder.bitcast(inside, ir.IntType(lanes))
        return builder.zext(mask, _I32) if lanes < 32 else mask  # uint32 or uint64
    return codegen


@intrinsic
def window_mask(typingctx, values, start, above, limit):
    """uint32 whose bit i is set iff above < values[start + i] <= limit (i < 16)."""
    return types.uint32(values, types.int64, types.int32, types.int32), _window(LANES)


@intrinsic
def window_mask64(typingctx, values, start, above, limit):
    """uint64 whose bit i is set iff above < values[start + i] <= limit (i < 64)."""
    return types.uint64(values, types.int64, types.int32, types.int32), _window(4 * LANES)


@intrinsic
def shift_records(typingctx, values, start, carried, limit, fill):
    """One block of the record shift of the OPT kernel, in place on values[start:start + 16].

    Walking the lanes in order with ``carried``: a lane whose value v has carried < v <=
    limit takes carried (``fill`` while carried is still the lowest int32) and carried
    becomes v. The records come from one prefix maximum of the values <= limit, so only
    its last step waits for ``carried``. Returns the final carried value.
    """
    sig = types.int32(values, types.int64, types.int32, types.int32, types.int32)

    def codegen(context, builder, signature, args):
        values_v, start_v, carried_v, limit_v, fill_v = args
        pointer = _block_pointer(context, builder, signature.args[0], values_v, start_v)
        block = builder.load(pointer, align=4)
        eligible = builder.icmp_signed("<=", block, _splat(builder, limit_v))
        running = builder.select(eligible, block, _LOWEST)  # becomes the inclusive prefix maximum
        step = 1
        while step < LANES:
            running = _max(builder, running, _shift_up(builder, running, step))
            step *= 2
        before = _max(builder, _shift_up(builder, running, 1), _splat(builder, carried_v))
        record = builder.and_(eligible, builder.icmp_signed(">", block, before))
        placed = builder.select(builder.icmp_signed("==", before, _LOWEST), _splat(builder, fill_v), before)
        builder.store(builder.select(record, placed, block), pointer, align=4)
        return _max(builder, builder.extract_element(running, ir.Constant(_I32, LANES - 1)), carried_v)
    return sig, codegen


def _reduce(builder, kind, vector):
    """The ``kind`` ("smin", "smax") reduction of a 16 x int32 vector."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_VECTOR]),
                                        f"llvm.vector.reduce.{kind}.v{LANES}i32")
    return builder.call(fn, [vector])


@intrinsic
def minimum_after_shift(typingctx, values, start, first, limit, fill):
    """min(values[start:start + 16]) once the first block of opt_stack's record shift has
    run, computed from the values before it (off the shift's dependency chain).

    Lanes before ``first`` are > limit and lane ``first`` is <= limit; the shift takes
    the largest value <= limit, M, out of the block and puts ``fill`` (> limit) in. So
    the least value stays unless it is M; then every value <= limit equals M, and the
    least of the other lanes and ``fill`` takes its place.
    """
    sig = types.int32(values, types.int64, types.uint32, types.int32, types.int32)

    def codegen(context, builder, signature, args):
        values_v, start_v, first_v, limit_v, fill_v = args
        block = builder.load(_block_pointer(context, builder, signature.args[0], values_v, start_v), align=4)
        eligible = builder.icmp_signed("<=", block, _splat(builder, limit_v))
        largest = _reduce(builder, "smax", builder.select(eligible, block, _LOWEST))
        least = _reduce(builder, "smin", block)
        lane = ir.Constant(_VECTOR, list(range(LANES)))
        at_first = builder.icmp_unsigned("==", lane, _splat(builder, first_v))
        others = _reduce(builder, "smin", builder.select(at_first, _splat(builder, fill_v), block))
        return builder.select(builder.icmp_signed(">", largest, least), least, others)
    return sig, codegen


@intrinsic
def below_mask(typingctx, values, start, ceiling):
    """uint32 whose bit i is set iff values[start + i] < ceiling (i < 16), for int64 values."""
    sig = types.uint32(values, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        values_v, start_v, ceiling_v = args
        block = builder.load(_block_pointer(context, builder, signature.args[0], values_v, start_v), align=8)
        below = builder.icmp_signed("<", block, _splat(builder, ceiling_v))
        return builder.zext(builder.bitcast(below, ir.IntType(LANES)), _I32)
    return sig, codegen
