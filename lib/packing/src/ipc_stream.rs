//! Arrow IPC stream messages laid out byte for byte as Arrow C++ (pyarrow, which `datasets`
//! writes with) lays them out, so that `--compat nxd` files equal `save_to_disk`'s.
//!
//! arrow-rs writes equally valid streams, but it builds the flatbuffer tables in another order
//! and so gives other header bytes. Here the tables are built with the generated `create`
//! functions (whose field order is the C++ generated code's) in the order of Arrow C++'s
//! `metadata_internal.cc`: a field's type and children before its name, the schema metadata
//! after the fields, record batch nodes before buffers. Bodies are 8-byte aligned, and a column
//! without nulls has a zero-length validity buffer, as pyarrow writes.

use arrow_ipc::{
    Buffer, Field, FieldArgs, FieldNode, Int, IntArgs, KeyValue, KeyValueArgs, List, ListArgs,
    Message, MessageArgs, MessageHeader, MetadataVersion, RecordBatch, RecordBatchArgs, Schema,
    SchemaArgs, Type,
};
use flatbuffers::FlatBufferBuilder;

/// The IPC alignment pyarrow writes with (message lengths and body buffers).
pub const ALIGNMENT: usize = 8;

/// The end-of-stream marker: continuation token, then a zero length.
pub const END_OF_STREAM: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];

const CONTINUATION: [u8; 4] = [0xff; 4];

/// A nullable `list<item: intN>` column (32-bit offsets, nullable signed integer items).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListColumn {
    /// The column name.
    pub name: &'static str,
    /// Bytes per item: 1, 2, 4 or 8.
    pub item_bytes: usize,
}

/// The number of zero bytes that pad `len` to the alignment.
pub fn padding(len: usize) -> usize {
    len.next_multiple_of(ALIGNMENT) - len
}

/// The framed Schema message: continuation token, length, flatbuffer, padding.
pub fn schema_message(columns: &[ListColumn], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let mut fields = Vec::with_capacity(columns.len());
    for column in columns {
        let item_type = Int::create(
            &mut fbb,
            &IntArgs {
                bitWidth: 8 * column.item_bytes as i32,
                is_signed: true,
            },
        );
        let item_name = fbb.create_string("item");
        let no_children = fbb.create_vector::<flatbuffers::WIPOffset<Field>>(&[]);
        let item = Field::create(
            &mut fbb,
            &FieldArgs {
                name: Some(item_name),
                nullable: true,
                type_type: Type::Int,
                type_: Some(item_type.as_union_value()),
                children: Some(no_children),
                ..Default::default()
            },
        );
        let list = List::create(&mut fbb, &ListArgs {});
        let name = fbb.create_string(column.name);
        let children = fbb.create_vector(&[item]);
        fields.push(Field::create(
            &mut fbb,
            &FieldArgs {
                name: Some(name),
                nullable: true,
                type_type: Type::List,
                type_: Some(list.as_union_value()),
                children: Some(children),
                ..Default::default()
            },
        ));
    }
    let fields = fbb.create_vector(&fields);
    let key_values: Vec<_> = metadata
        .iter()
        .map(|(key, value)| {
            let key = fbb.create_string(key);
            let value = fbb.create_string(value);
            KeyValue::create(
                &mut fbb,
                &KeyValueArgs {
                    key: Some(key),
                    value: Some(value),
                },
            )
        })
        .collect();
    let custom_metadata = fbb.create_vector(&key_values);
    let schema = Schema::create(
        &mut fbb,
        &SchemaArgs {
            fields: Some(fields),
            custom_metadata: Some(custom_metadata),
            ..Default::default()
        },
    );
    finish_message(fbb, MessageHeader::Schema, schema.as_union_value(), 0)
}

/// The body layout of a record batch of `rows` lists of `block` items in each column: the
/// buffers (validity, offsets, item validity, items) one after another, each padded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLayout {
    /// `(offset, length)` of every body buffer, in message order.
    pub buffers: Vec<(usize, usize)>,
    /// `(length, null_count)` of every field node (a list, then its items, per column).
    pub nodes: Vec<(usize, usize)>,
    /// The body's length in bytes, padding included.
    pub body_len: usize,
}

impl BatchLayout {
    /// The layout of `rows` rows of `block` items in each of `columns`.
    pub fn new(columns: &[ListColumn], rows: usize, block: usize) -> Self {
        let mut buffers = Vec::with_capacity(4 * columns.len());
        let mut nodes = Vec::with_capacity(2 * columns.len());
        let mut offset = 0;
        let mut push = |len: usize| {
            buffers.push((offset, len));
            offset += len + padding(len);
        };
        for column in columns {
            nodes.push((rows, 0));
            push(0);
            push(4 * (rows + 1));
            nodes.push((rows * block, 0));
            push(0);
            push(column.item_bytes * rows * block);
        }
        BatchLayout {
            buffers,
            nodes,
            body_len: offset,
        }
    }
}

/// The framed RecordBatch message (header only: the body follows it in the stream).
pub fn record_batch_message(rows: usize, layout: &BatchLayout) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let nodes: Vec<FieldNode> = layout
        .nodes
        .iter()
        .map(|&(length, nulls)| FieldNode::new(length as i64, nulls as i64))
        .collect();
    let nodes = fbb.create_vector(&nodes);
    let buffers: Vec<Buffer> = layout
        .buffers
        .iter()
        .map(|&(offset, len)| Buffer::new(offset as i64, len as i64))
        .collect();
    let buffers = fbb.create_vector(&buffers);
    let batch = RecordBatch::create(
        &mut fbb,
        &RecordBatchArgs {
            length: rows as i64,
            nodes: Some(nodes),
            buffers: Some(buffers),
            ..Default::default()
        },
    );
    finish_message(
        fbb,
        MessageHeader::RecordBatch,
        batch.as_union_value(),
        layout.body_len,
    )
}

/// Wraps `header` in a V5 Message and frames it as Arrow C++'s `WriteMessage` does: the
/// flatbuffer padded so that the 8-byte prefix plus it is a multiple of the alignment.
fn finish_message(
    mut fbb: FlatBufferBuilder,
    header_type: MessageHeader,
    header: flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
    body_len: usize,
) -> Vec<u8> {
    let message = Message::create(
        &mut fbb,
        &MessageArgs {
            version: MetadataVersion::V5,
            header_type,
            header: Some(header),
            bodyLength: body_len as i64,
            custom_metadata: None,
        },
    );
    fbb.finish(message, None);
    let flatbuffer = fbb.finished_data();
    let padded = flatbuffer.len() + padding(flatbuffer.len());
    let mut out = Vec::with_capacity(8 + padded);
    out.extend_from_slice(&CONTINUATION);
    out.extend_from_slice(&(padded as i32).to_le_bytes());
    out.extend_from_slice(flatbuffer);
    out.resize(8 + padded, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLUMNS: [ListColumn; 2] = [
        ListColumn {
            name: "a",
            item_bytes: 4,
        },
        ListColumn {
            name: "b",
            item_bytes: 1,
        },
    ];

    #[test]
    fn layout_pads_every_buffer_to_eight_bytes() {
        let layout = BatchLayout::new(&COLUMNS, 3, 5);
        // a: offsets 16 bytes, items 60 (+4); b: offsets 16, items 15 (+1).
        assert_eq!(
            layout.buffers,
            vec![
                (0, 0),
                (0, 16),
                (16, 0),
                (16, 60),
                (80, 0),
                (80, 16),
                (96, 0),
                (96, 15)
            ]
        );
        assert_eq!(layout.nodes, vec![(3, 0), (15, 0), (3, 0), (15, 0)]);
        assert_eq!(layout.body_len, 112);
    }

    #[test]
    fn messages_are_framed_and_readable() {
        let schema = schema_message(&COLUMNS, &[("k", "v")]);
        assert_eq!(&schema[..4], &CONTINUATION);
        let len = i32::from_le_bytes(schema[4..8].try_into().unwrap()) as usize;
        assert_eq!(schema.len(), 8 + len);
        assert_eq!(schema.len() % ALIGNMENT, 0);
        let message = arrow_ipc::root_as_message(&schema[8..]).unwrap();
        let parsed = message.header_as_schema().unwrap();
        let fields = parsed.fields().unwrap();
        assert_eq!(fields.len(), 2);
        assert_eq!(fields.get(1).name(), Some("b"));
        assert_eq!(fields.get(1).type_type(), Type::List);
        let item = fields.get(1).children().unwrap().get(0);
        assert_eq!(item.type_as_int().unwrap().bitWidth(), 8);
        assert_eq!(parsed.custom_metadata().unwrap().get(0).value(), Some("v"));

        let layout = BatchLayout::new(&COLUMNS, 3, 5);
        let batch = record_batch_message(3, &layout);
        let message = arrow_ipc::root_as_message(&batch[8..]).unwrap();
        assert_eq!(message.bodyLength(), 112);
        let parsed = message.header_as_record_batch().unwrap();
        assert_eq!(parsed.length(), 3);
        assert_eq!(parsed.buffers().unwrap().get(7).length(), 15);
    }
}
